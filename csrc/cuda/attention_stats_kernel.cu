// CUDA attention_stats, flash-style: one CTA of 4 warps takes 64 queries of one (batch, head);
// each warp owns 16 query rows and walks the CTA's key range in tiles of 64 keys staged through
// shared memory (cp.async, double-buffered). Per tile a warp computes its 16 x 64 scores into
// registers and folds them into the online-softmax state of its rows; the scores never leave
// registers and no [q_len, k_len] tile exists anywhere.
//
// Scores. bf16/fp16 inputs: mma.sync m16n8k16 on tensor cores with float32 accumulators, q held
// in registers as A fragments for the whole pass. float32/float64 inputs: float32 FMA (SIMT) from
// shared memory, written to produce the very same fragment layout, so the online update below is
// shared. tf32 tensor cores would round q and k to 10 mantissa bits, far outside the 1e-4
// tolerances, so float32 stays on FMA; float64 is read as float32 (the precision of the state).
//
// Fragment layout (PTX ISA, m16n8k16 C/D): lane = 4 * g + c (g = lane / 4, c = lane % 4) holds,
// for each of the 8 key groups n of a tile, acc[n][0..1] = row g, keys 8n + 2c + {0,1} and
// acc[n][2..3] = row g + 8, same keys. A row's 64 scores are thus spread over the 4 lanes of a
// quad: row maxima are two shuffles, and l, t, u stay per lane until the end.
//
// Online update in base 2 (exp2 is one instruction): s2 = s * log2(e), m running max of s2,
//   l = sum 2^(s2-m),  t = sum 2^(s2-m) (s2-m),  u = sum 2^(s2-m) (i' - j);
// a new max m' rescales by a = 2^(m-m'), t' = a (t + (m - m') l). At the end, in nats:
//   lse = ln2 (m + log2 l),  entropy = ln2 (log2 l - t / l),  max_weight = 1 / l.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "attention_stats_launch.h"
#include "element_type.h"
#include "warp_primitives.cuh"

namespace recon_fast::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 16;
constexpr int kBlockM = kWarps * kRowsPerWarp;  // queries per CTA
constexpr int kBlockN = 64;                      // keys per tile
constexpr int kGroups = kBlockN / 8;             // mma n-tiles of 8 keys
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// 2^-200 is 0 in float32: masked keys clamp their (s - m) here, so e * (s - m) is 0, not 0 * inf.
constexpr float kExp2Floor = -200.f;

template <typename T> struct Traits;
// smem_t: what shared memory holds; tensor: scores on tensor cores (mma) or FMA.
template <> struct Traits<__nv_bfloat16> { using smem_t = __nv_bfloat16; static constexpr bool tensor = true; };
template <> struct Traits<__half> { using smem_t = __half; static constexpr bool tensor = true; };
template <> struct Traits<float> { using smem_t = float; static constexpr bool tensor = false; };
template <> struct Traits<double> { using smem_t = float; static constexpr bool tensor = false; };

template <typename S, typename T> __device__ __forceinline__ S convert(T v);
template <> __device__ __forceinline__ float convert<float, float>(float v) { return v; }
template <> __device__ __forceinline__ float convert<float, double>(double v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ __half convert<__half, __half>(__half v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 convert<__nv_bfloat16, __nv_bfloat16>(__nv_bfloat16 v) { return v; }
// Zero as S without implicit conversions (torch builds define __CUDA_NO_HALF_CONVERSIONS__).
template <typename S> __device__ __forceinline__ S zero_of();
template <> __device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <> __device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }

// Row stride in shared memory: head_dim padded by 16 bytes, so the 8 rows a quad-group reads at
// once fall in different banks.
template <typename S, int kDPad>
__host__ __device__ constexpr int smem_ld() { return kDPad + 16 / static_cast<int>(sizeof(S)); }

// Copies rows [row0, row0 + kRows) of a [len, dim] matrix (row stride `stride` elements, last dim
// contiguous) into shared memory as S, zero beyond len and beyond dim up to kDPad. The 16-byte
// cp.async path needs dim and the stride in whole 16-byte chunks and an aligned base; anything
// else takes the element-wise path (which also converts float64).
template <typename T, typename S, int kDPad, int kRows>
__device__ __forceinline__ void load_rows(S* dst, const T* src, int64_t stride, int64_t row0,
                                          int64_t len, int dim, bool vec_ok) {
  constexpr int kLd = smem_ld<S, kDPad>();
  if constexpr (sizeof(T) == sizeof(S)) {
    if (vec_ok) {
      constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte chunk
      constexpr int kChunks = kDPad / kPer;
      for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
        const int r = idx / kChunks, c = (idx % kChunks) * kPer;
        S* d = dst + r * kLd + c;
        const int64_t row = row0 + r;
        if (row < len && c < dim) {
          cp_async_16(d, src + row * stride + c);
        } else {
          *reinterpret_cast<int4*>(d) = make_int4(0, 0, 0, 0);
        }
      }
      return;
    }
  }
  for (int idx = threadIdx.x; idx < kRows * kDPad; idx += kThreads) {
    const int r = idx / kDPad, c = idx % kDPad;
    const int64_t row = row0 + r;
    dst[r * kLd + c] = row < len && c < dim ? convert<S>(src[row * stride + c]) : zero_of<S>();
  }
}

// The online state of one query row, per lane (the quad's lanes hold disjoint keys).
struct RowState {
  float m;               // running max of s2 (shared by the quad)
  float l, t, u, sink;   // this lane's partial sums relative to m
  int argmax;            // first key holding m (shared by the quad)
  float s_self, s_prev;  // s2 at j = i' and j = i' - 1, where this lane saw them
};

template <typename T, int kDPad>
__global__ void __launch_bounds__(kThreads)
attention_stats_kernel(const AttentionStatsProblem p, bool vec_ok) {
  using S = typename Traits<T>::smem_t;
  constexpr bool kTensor = Traits<T>::tensor;
  constexpr int kLd = smem_ld<S, kDPad>();
  // float32 at head_dim 256 would need 198 KiB double-buffered; one stage keeps it under A100's
  // 163 KiB.
  constexpr int kStages = (!kTensor && kDPad > 128) ? 1 : 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  S* q_s = reinterpret_cast<S*>(smem_raw);                 // [kBlockM][kLd]
  S* k_s = q_s + kBlockM * kLd;                            // [kStages][kBlockN][kLd]
  float* bias_s = reinterpret_cast<float*>(k_s + kStages * kBlockN * kLd);  // [kStages][kBlockN]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  // Heaviest query blocks (latest under a causal mask) first: a shorter tail.
  const int64_t qblock = gridDim.x - 1 - blockIdx.x;
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / p.group_size();
  const int64_t q0 = qblock * kBlockM, off = p.query_offset();
  const int64_t n_rows = p.q_len - q0 < kBlockM ? p.q_len - q0 : kBlockM;
  const T* q_src = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* k_src = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const int dim = static_cast<int>(p.head_dim);

  int64_t lo, hi, unused;  // keys the CTA needs: rows' ranges move right with the row
  p.key_range(q0 + off, lo, unused);
  p.key_range(q0 + n_rows - 1 + off, unused, hi);
  const int64_t tile_begin = lo / kBlockN;
  const int64_t tile_end = hi > lo ? (hi + kBlockN - 1) / kBlockN : tile_begin;

  auto load_tile = [&](int64_t tile, int stage) {
    const int64_t j0 = tile * kBlockN;
    load_rows<T, S, kDPad, kBlockN>(k_s + stage * kBlockN * kLd, k_src, p.k_stride_t, j0, p.k_len,
                                    dim, vec_ok);
    if (p.key_padding != nullptr) {
      for (int x = threadIdx.x; x < kBlockN; x += kThreads) {
        const int64_t j = j0 + x;
        bias_s[stage * kBlockN + x] =
            j < p.k_len && p.key_padding[b * p.key_padding_stride_b + j * p.key_padding_stride_t]
                ? 0.f : -INFINITY;
      }
    }
  };

  load_rows<T, S, kDPad, kBlockM>(q_s, q_src, p.q_stride_t, q0, p.q_len, dim, vec_ok);
  if (tile_begin < tile_end) load_tile(tile_begin, 0);
  cp_async_commit();

  const int row_a = warp * kRowsPerWarp + g;  // this lane's two rows within the CTA
  // Positions and key indices fit 32 bits (the launcher checks): the per-key work stays 32-bit.
  const int pos[2] = {static_cast<int>(q0 + row_a + off), static_cast<int>(q0 + row_a + 8 + off)};
  int row_lo[2], row_hi[2];
  for (int r = 0; r < 2; ++r) {
    int64_t rlo, rhi;
    p.key_range(pos[r], rlo, rhi);
    row_lo[r] = static_cast<int>(rlo);
    row_hi[r] = static_cast<int>(rhi < rlo ? rlo : rhi);
  }
  const int sink_end = static_cast<int>(p.sink_tokens < p.k_len ? p.sink_tokens : p.k_len);
  const float scale2 = p.scaling * kLog2e;
  const bool plain_scores =
      p.softcap <= 0.f && p.key_padding == nullptr && p.mask_kind == AttentionMaskKind::None;
  // The warp's rows span [first row, first row + 15]: for whole-tile decisions.
  int64_t warp_lo_min, warp_hi_min, warp_lo_max, warp_hi_max;
  p.key_range(q0 + warp * kRowsPerWarp + off, warp_lo_min, warp_hi_min);
  p.key_range(q0 + warp * kRowsPerWarp + kRowsPerWarp - 1 + off, warp_lo_max, warp_hi_max);

  RowState st[2];
  for (int r = 0; r < 2; ++r) {
    st[r].m = -INFINITY;
    st[r].l = st[r].t = st[r].u = st[r].sink = 0.f;
    st[r].argmax = -1;
    st[r].s_self = st[r].s_prev = -INFINITY;
  }

  uint32_t q_frag[kTensor ? kDPad / 16 : 1][4];

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int stage = kStages == 1 ? 0 : static_cast<int>((tile - tile_begin) & 1);
    if (kStages == 2 && tile + 1 < tile_end) {
      load_tile(tile + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (kTensor) {
      if (tile == tile_begin) {  // q's A fragments, once: row g / g + 8, k 2c..2c+1 / +8
        const uint32_t* qa = reinterpret_cast<const uint32_t*>(q_s + row_a * kLd);
        const uint32_t* qb = reinterpret_cast<const uint32_t*>(q_s + (row_a + 8) * kLd);
#pragma unroll
        for (int ks = 0; ks < kDPad / 16; ++ks) {
          q_frag[ks][0] = qa[ks * 8 + c];
          q_frag[ks][1] = qb[ks * 8 + c];
          q_frag[ks][2] = qa[ks * 8 + 4 + c];
          q_frag[ks][3] = qb[ks * 8 + 4 + c];
        }
      }
    }
    const int j0 = static_cast<int>(tile * kBlockN);
    // Warp-uniform: skip a tile none of the warp's rows sees; check keys one by one only where
    // the tile crosses some row's range (or k_len).
    const bool warp_sees = warp_hi_max > j0 && warp_lo_min < j0 + kBlockN;
    const bool tile_inside = warp_lo_max <= j0 && warp_hi_min >= j0 + kBlockN;
    if (warp_sees) {
      const S* ks_tile = k_s + stage * kBlockN * kLd;
      float acc[kGroups][4];
#pragma unroll
      for (int n = 0; n < kGroups; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
      if constexpr (kTensor) {
#pragma unroll
        for (int ks = 0; ks < kDPad / 16; ++ks) {
#pragma unroll
          for (int n = 0; n < kGroups; ++n) {
            const uint32_t* kr = reinterpret_cast<const uint32_t*>(ks_tile + (n * 8 + g) * kLd);
            mma_16816<T>(acc[n], q_frag[ks], kr[ks * 8 + c], kr[ks * 8 + 4 + c]);
          }
        }
      } else {
        const float* qa = reinterpret_cast<const float*>(q_s) + row_a * kLd;
        const float* qb = qa + 8 * kLd;
        const float* kf = reinterpret_cast<const float*>(ks_tile);
#pragma unroll 2
        for (int d = 0; d < kDPad; d += 4) {
          const float4 a = *reinterpret_cast<const float4*>(qa + d);
          const float4 bq = *reinterpret_cast<const float4*>(qb + d);
#pragma unroll
          for (int n = 0; n < kGroups; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float4 kv = *reinterpret_cast<const float4*>(kf + (n * 8 + 2 * c + e) * kLd + d);
              acc[n][e] += a.x * kv.x + a.y * kv.y + a.z * kv.z + a.w * kv.w;
              acc[n][2 + e] += bq.x * kv.x + bq.y * kv.y + bq.z * kv.z + bq.w * kv.w;
            }
          }
        }
      }

      // Scores: scale, soft-cap, masks; then in base 2.
#pragma unroll
      for (int n = 0; n < kGroups; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2, col = n * 8 + 2 * c + (e & 1);
          const int j = j0 + col;
          if (plain_scores) {
            acc[n][e] *= scale2;
            if (!tile_inside && (j < row_lo[r] || j >= row_hi[r])) acc[n][e] = -INFINITY;
            continue;
          }
          float s = acc[n][e] * p.scaling;
          if (p.softcap > 0.f) s = p.softcap * tanhf(s / p.softcap);
          if (p.key_padding != nullptr) s += bias_s[stage * kBlockN + col];
          if (p.mask_kind != AttentionMaskKind::None) {
            const int64_t i = q0 + row_a + 8 * r;
            if (i < p.q_len && j < p.k_len) {
              const int64_t at = b * p.mask_stride_b + h * p.mask_stride_h + i * p.mask_stride_q +
                                 j * p.mask_stride_k;
              if (p.mask_kind == AttentionMaskKind::Bool) {
                if (!static_cast<const bool*>(p.mask)[at]) s = -INFINITY;
              } else {
                s += static_cast<const float*>(p.mask)[at];
              }
            }
          }
          if (!tile_inside && (j < row_lo[r] || j >= row_hi[r])) s = -INFINITY;
          acc[n][e] = s * kLog2e;
        }
      }

#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < kGroups; ++n)
          tile_max = fmaxf(tile_max, fmaxf(acc[n][2 * r], acc[n][2 * r + 1]));
        tile_max = quad_max(tile_max);
        RowState& rs = st[r];
        // Quad-uniform only: every shuffle below runs outside these branches (full-warp masks).
        const bool rises = tile_max > rs.m;  // false for a tile this row cannot see
        int first = kBlockN;  // the new max's first key in this tile: the argmax when it rises
        if (rises) {
#pragma unroll
          for (int n = kGroups - 1; n >= 0; --n) {
            if (acc[n][2 * r + 1] == tile_max) first = n * 8 + 2 * c + 1;
            if (acc[n][2 * r] == tile_max) first = n * 8 + 2 * c;
          }
        }
        first = quad_min(first);
        if (rises) {
          if (rs.m > -INFINITY) {
            const float delta = rs.m - tile_max, a = exp2f(delta);
            rs.t = a * (rs.t + delta * rs.l);
            rs.l *= a;
            rs.u *= a;
            rs.sink *= a;
          }
          rs.m = tile_max;
          rs.argmax = j0 + first;
        }
        if (!(tile_max > -INFINITY)) continue;  // nothing visible here; no shuffle follows in r
        const float dist0 = static_cast<float>(pos[r] - j0 - 2 * c);
        // Tile-level tests keep the per-key sink/self/prev checks off most tiles.
        const bool sink_tile = j0 < sink_end;
        const bool diag_tile = pos[r] >= j0 && pos[r] - 1 < j0 + kBlockN;
#pragma unroll
        for (int n = 0; n < kGroups; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = n * 8 + 2 * c + e;
            const float s2 = acc[n][2 * r + e];
            const float d = fmaxf(s2 - rs.m, kExp2Floor);
            const float w = exp2f(d);
            rs.l += w;
            rs.t = fmaf(w, d, rs.t);
            rs.u = fmaf(w, dist0 - static_cast<float>(n * 8 + e), rs.u);
            if (sink_tile && j0 + col < sink_end) rs.sink += w;
            if (diag_tile) {
              if (j0 + col == pos[r]) rs.s_self = s2;
              if (j0 + col == pos[r] - 1) rs.s_prev = s2;
            }
          }
        }
      }
    }
    __syncthreads();  // the stage just read is the next prefetch's destination
    if (kStages == 1 && tile + 1 < tile_end) {
      load_tile(tile + 1, 0);
      cp_async_commit();
    }
  }

  // Combine the quad's lanes and write rows g and g + 8 (lane c == 0 writes).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    RowState& rs = st[r];
    const float l = quad_sum(rs.l), t = quad_sum(rs.t), u = quad_sum(rs.u),
                sink = quad_sum(rs.sink);
    const float s_self = quad_max(rs.s_self), s_prev = quad_max(rs.s_prev);
    const int64_t i = q0 + row_a + 8 * r;
    if (c != 0 || i >= p.q_len) continue;
    float o[kNumAttentionStats];
    if (rs.m > -INFINITY && l > 0.f) {
      const float log2_l = log2f(l);
      o[kStatEntropy] = kLn2 * (log2_l - t / l);
      o[kStatMaxWeight] = 1.f / l;
      o[kStatArgmax] = static_cast<float>(rs.argmax);
      o[kStatSinkMass] = sink / l;
      o[kStatMeanDistance] = u / l;
      o[kStatSelfWeight] = exp2f(s_self - rs.m) / l;
      o[kStatPrevWeight] = exp2f(s_prev - rs.m) / l;
      o[kStatLse] = kLn2 * (rs.m + log2_l);
    } else {  // no visible key: the statistics do not exist
#pragma unroll
      for (int x = 0; x < kNumAttentionStats; ++x) o[x] = __int_as_float(0x7fc00000);
    }
    static_assert(kNumAttentionStats == 8, "a row is written as the two float4 stores below");
    float4* dst = reinterpret_cast<float4*>(p.out + ((b * p.heads + h) * p.q_len + i) * kNumAttentionStats);
    dst[0] = make_float4(o[0], o[1], o[2], o[3]);
    dst[1] = make_float4(o[4], o[5], o[6], o[7]);
  }
}

template <typename T, int kDPad>
cudaError_t launch_for(const AttentionStatsProblem& p, cudaStream_t stream) {
  using S = typename Traits<T>::smem_t;
  constexpr int kLd = smem_ld<S, kDPad>();
  constexpr int kStages = (!Traits<T>::tensor && kDPad > 128) ? 1 : 2;
  const size_t smem = sizeof(S) * (kBlockM + kStages * kBlockN) * kLd + sizeof(float) * kStages * kBlockN;
  auto kernel = attention_stats_kernel<T, kDPad>;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  // 16-byte copies need head_dim, the row strides and the bases in whole 16-byte units.
  constexpr int64_t kPer = 16 / sizeof(T);
  const bool vec_ok = sizeof(T) == sizeof(S) && p.head_dim % kPer == 0 &&
                      p.q_stride_t % kPer == 0 && p.k_stride_t % kPer == 0 &&
                      p.q_stride_h % kPer == 0 && p.k_stride_h % kPer == 0 &&
                      p.q_stride_b % kPer == 0 && p.k_stride_b % kPer == 0 &&
                      reinterpret_cast<uintptr_t>(p.q) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(p.k) % 16 == 0;
  const dim3 grid(static_cast<unsigned>((p.q_len + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, smem, stream>>>(p, vec_ok);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_dtype(const AttentionStatsProblem& p, cudaStream_t stream) {
  // head_dim padded to the next instantiated multiple of 16 (zeros beyond head_dim).
  if (p.head_dim <= 32) return launch_for<T, 32>(p, stream);
  if (p.head_dim <= 64) return launch_for<T, 64>(p, stream);
  if (p.head_dim <= 80) return launch_for<T, 80>(p, stream);
  if (p.head_dim <= 96) return launch_for<T, 96>(p, stream);
  if (p.head_dim <= 128) return launch_for<T, 128>(p, stream);
  if (p.head_dim <= 256) return launch_for<T, 256>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_attention_stats(const AttentionStatsProblem& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.q_len == 0) return cudaSuccess;
  if (p.k_len >= 0x7fffffffLL - 2 * kBlockN || p.q_len >= 0x7fffffffLL || p.heads > 65535 ||
      p.batch > 65535)
    return cudaErrorInvalidValue;  // 32-bit key positions, grid limits
  return with_element_type(p.dtype, [&](auto tag) {
    return launch_for_dtype<typename decltype(tag)::type>(p, stream);
  });
}

}  // namespace recon_fast::cuda
