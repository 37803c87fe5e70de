// CUDA attention_stats for the linear case (issue 18, route a): 16-bit q and k, no soft-cap, no
// general mask (causal, window and key padding are 0/1 masks: fine), scaling > 0. Everything else
// takes the per-score kernel (attention_stats_kernel.cu), which stays the reference. Not yet run on
// a GPU: tests/test_attention_stats_linear.py runs it on the CPU under a CUDA emulation
// (attention_stats_mma_emulation.h) against the float64 reference, both variants.
//
// Why it should be faster than the per-score kernel (H100, 1B shape, bf16: 4.0-4.2x sdpa's
// forward; ~212 registers, ~25 instructions of online update per score). Per score, flash
// attention's forward does one FFMA + one MUFU.EX2 (the exp), one FMNMX (the max), one FADD (the
// row sum) and its share of the mma's; the per-score kernel adds mask tests, clamps, a per-score
// distance, sink and diagonal tests and an exp2f with denormal handling. Here:
//   - masks are applied only on tiles that cross some row's key range (or under key padding);
//     interior tiles run the bare update; sink, self and previous weights are read only on the
//     one or two tiles that hold those keys; the argmax search runs only on tiles whose maximum
//     rises (a warp vote);
//   - the exp is ex2.approx.ftz of s * scale2 - m, one FFMA; K's fragments come by ldmatrix;
//   - kOnMma ("mma", route a proper): the linear statistics ride on a second product on the
//     tensor cores, P~ [K | j - j0 | 1] with P~ = hi + lo, the weights split into two 16-bit
//     halves (kernels/attention_stats_linear.py is this arithmetic in PyTorch):
//     E_w[s2 - m] = (scale2 q.(P~K) - m P~1) / P~1 and sum w (j - j0) come out of the mma
//     accumulators. Per score the FMA pipe keeps FFMA, EX2, FADD (exact l), FMNMX and the split
//     (cvt, unpack, FADD, cvt); per 16 x 64 warp tile the tensor pipe does D/2 mma's for q.k and
//     8 (D/8 + 1) for the second product (D = 64: 32 + 72). Its limit: at the sharpest heads
//     (|q| |k| scaling ~ 100 nats) the entropy is off by a few 1e-5 (the fma variant is not).
//   - !kOnMma ("fma": the same kernel with those sums on the FMA pipe): per score t += w d and
//     v += w (key offset, an immediate) next to l += w; two FFMA's instead of the split and the
//     72 mma's. By issue slots it should beat kOnMma at D = 64; RECON_FAST_ATTENTION_KERNEL picks
//     either, so one GPU run settles it.
// Registers (nvcc 13 -Xptxas -v, sm_90, bf16, D = 64): fma 128 (two CTAs of 8 warps per SM), mma
// ~206 (one). What to measure (benchmarks/bench_attention_stats.py, run_gpu.sh bench-attention):
// time per layer against sdpa's forward for score / mma / fma at T = 4096 and 32768 (target
// <= 1.3x), the 1B forward with stats on every layer (<= 1.5x); ncu: issue-slot, tensor-pipe and
// MUFU utilisation, achieved occupancy, and whether __launch_bounds__(256, 2) (spills) pays for mma.
//
// Layout. One CTA of 8 warps takes 128 queries of one (batch, head); each warp owns 16 query rows
// and walks the CTA's key range in tiles of 64 keys (cp.async, double-buffered; the q tile is
// staged through the same shared memory once, then lives in registers as mma A fragments).
// Fragment layout (PTX ISA, m16n8k16): lane = 4 g + c holds, for key group n (8 keys), C[n][0..1]
// = row g, keys 8n + 2c + {0,1} and C[n][2..3] = row g + 8, same keys, which is also the A
// layout of the weights for the second product (keys 16kk.. as its k dimension), the register
// reuse flash attention 2 does for P.V.
//
// Online state per row, base 2 (s2 = s * scaling * log2 e, m its running max), per lane:
//   l = sum w, w = 2^(s2 - m); a rise of the max to m' rescales every sum by a = 2^(m - m').
//   fma:  t = sum w (s2 - m) (t' = a (t + (m - m') l)), u = sum w (i' - j): per tile
//         (i' - j0 - 2c) sum w - sum w (8n + e);  entropy = ln2 (log2 l - t / l), mean_distance u / l.
//   mma:  u = sum_tiles (i' - j0) sum w; pk = P~ K, px = [P~ (j - j0), P~ 1];
//         entropy = ln2 (log2 l - (scale2 q.pk - m px1) / px1), mean_distance (u - px0) / l.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "attention_stats_launch.h"
#include "warp_primitives.cuh"  // cp.async, mma_16816, quad reductions; the emulation under RECON_FAST_CUDA_EMULATION

namespace recon_fast::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 16;
constexpr int kBlockM = kWarps * kRowsPerWarp;  // queries per CTA
constexpr int kBlockN = 64;                      // keys per tile
constexpr int kGroups = kBlockN / 8;             // mma n-tiles of 8 keys
constexpr int kKeySteps = kBlockN / 16;          // k-steps of 16 keys in the second product
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// fma variant, tiles with masked keys: (s2 - m) clamps here so that w (s2 - m) is 0, not 0 * -inf.
constexpr float kExp2Floor = -200.f;
// The second product's head_dim limit: its accumulators take (D / 8 + 1) * 4 registers.
constexpr int kMaxMmaHeadDim = 128;

// Shared-memory row stride: head_dim padded by 16 bytes, so that the 8 rows one ldmatrix phase
// reads fall in 8 different 4-bank groups.
template <int kDPad>
__host__ __device__ constexpr int row_stride() { return kDPad + 8; }
// The q tile ([kBlockM][ld]) and the two key stages ([2][kBlockN][ld]) share these bytes.
template <int kDPad>
__host__ __device__ constexpr size_t tile_bytes() {
  return 2u * kBlockN * row_stride<kDPad>() * sizeof(uint16_t);
}
static_assert(kBlockM == 2 * kBlockN, "the q tile must fit in the two key stages it aliases");

__device__ __forceinline__ unsigned char* dynamic_smem() {
#if defined(RECON_FAST_CUDA_EMULATION)
  return emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
#endif
}

// Four 8x8 b16 matrices; lane t gives the address of row t % 8 of matrix t / 8 (16-byte aligned).
// Plain: lane 4g + c receives row g, columns 2c, 2c + 1 of each matrix. Transposed: column g,
// rows 2c, 2c + 1.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
#if defined(RECON_FAST_CUDA_EMULATION)
  emu::ldmatrix_x4(r, row_address, kTrans);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row_address)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row_address)));
  }
#else
  (void)r; (void)row_address;
  __trap();
#endif
}

// 2^x, flushing results below 2^-126 to 0 (weights that small are nothing next to the max's 1).
__device__ __forceinline__ float exp2_ftz(float x) {
#if defined(RECON_FAST_CUDA_EMULATION)
  return emu::exp2_ftz(x);
#elif defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// Two floats as one register of two T (round to nearest), low half first; and back.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));  // exact
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

// The weights enter the second product multiplied by this (exact: a power of 2). float16 has 5
// exponent bits: below 2^-14 its values lose bits, and a sharp head's many tiny weights times their
// large (s2 - m) then cost the entropy ~1e-5 (seen on 600 keys); 2^15 w stays below 65504 and is
// normal down to w = 2^-29. bfloat16 has float32's range. Every sum of the product divides it out.
template <typename T>
constexpr float kWeightScale = std::is_same_v<T, __half> ? 32768.f : 1.f;

// The weights w0, w1 (adjacent keys of one row) as hi + lo, each a register of two T: hi rounds
// w, lo rounds what hi missed; together ~16 (bfloat16) or ~22 (float16) significant bits
// (kernels/attention_stats_linear.py does the same).
template <typename T>
__device__ __forceinline__ void split2(float w0, float w1, uint32_t& hi, uint32_t& lo) {
  w0 *= kWeightScale<T>;
  w1 *= kWeightScale<T>;
  hi = pack2<T>(w0, w1);
  const float2 h = unpack2<T>(hi);
  lo = pack2<T>(w0 - h.x, w1 - h.y);
}

// Rows [row0, row0 + kRows) of a [len, dim] matrix of T (row stride `stride`, last dim
// contiguous) into shared memory, zero beyond len and beyond dim up to kDPad. 16-byte cp.async
// when dim, the strides and the base allow it (vec_ok); element-wise otherwise.
template <typename T, int kDPad, int kRows>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t stride, int64_t row0,
                                          int64_t len, int dim, bool vec_ok) {
  constexpr int kLd = row_stride<kDPad>();
  if (vec_ok) {
    constexpr int kPer = 16 / sizeof(T);
    constexpr int kChunks = kDPad / kPer;
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
      const int r = idx / kChunks, col = (idx % kChunks) * kPer;
      T* d = dst + r * kLd + col;
      const int64_t row = row0 + r;
      if (row < len && col < dim) {
        cp_async_16(d, src + row * stride + col);
      } else {
        *reinterpret_cast<int4*>(d) = make_int4(0, 0, 0, 0);
      }
    }
    return;
  }
  const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
  uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
  for (int idx = threadIdx.x; idx < kRows * kDPad; idx += kThreads) {
    const int r = idx / kDPad, col = idx % kDPad;
    const int64_t row = row0 + r;
    d16[r * kLd + col] = row < len && col < dim ? s16[row * stride + col] : uint16_t{0};
  }
}

// The online state of one query row, per lane (the quad's lanes hold disjoint keys).
struct RowState {
  float m_raw;           // running max of the raw score q.k (shared by the quad)
  float m;               // m_raw * scale2: the running max in base-2 units
  float l, t, u, sink;   // this lane's sums relative to m (t: fma variant only)
  int argmax;            // first key holding the max (shared by the quad)
  float self_raw, prev_raw;  // raw scores at j = i' and j = i' - 1, where this lane saw them
};

template <typename T, int kDPad, bool kOnMma>
__global__ void __launch_bounds__(kThreads)
attention_stats_mma_kernel(const AttentionStatsProblem p, bool vec_ok) {
  static_assert(!kOnMma || kDPad <= kMaxMmaHeadDim, "the second product is limited to head_dim 128");
  constexpr int kLd = row_stride<kDPad>();
  constexpr int kSteps = kDPad / 16;  // k-steps of q.k; also pairs of 8-wide n-tiles of P~ K
  unsigned char* smem = dynamic_smem();
  T* q_s = reinterpret_cast<T*>(smem);                                  // [kBlockM][kLd], at the start
  T* k_s = reinterpret_cast<T*>(smem);                                  // [2][kBlockN][kLd], after
  float* bias_s = reinterpret_cast<float*>(smem + tile_bytes<kDPad>());  // [2][kBlockN]: 0 or -inf

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  // Heaviest query blocks (latest under a causal mask) first: a shorter tail.
  const int64_t qblock = gridDim.x - 1 - blockIdx.x;
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / p.group_size();
  const int64_t q0 = qblock * kBlockM, off = p.query_offset();
  const int64_t n_rows = p.q_len - q0 < kBlockM ? p.q_len - q0 : kBlockM;
  const T* q_src = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* k_src = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const int dim = static_cast<int>(p.head_dim);
  const bool padded = p.key_padding != nullptr;

  int64_t lo, hi, unused;  // keys the CTA needs: rows' ranges move right with the row
  p.key_range(q0 + off, lo, unused);
  p.key_range(q0 + n_rows - 1 + off, unused, hi);
  const int64_t tile_begin = lo / kBlockN;
  const int64_t tile_end = hi > lo ? (hi + kBlockN - 1) / kBlockN : tile_begin;

  // q: staged through shared memory into A fragments (row g / g + 8, k 2c..2c+1 / +8), once.
  load_rows<T, kDPad, kBlockM>(q_s, q_src, p.q_stride_t, q0, p.q_len, dim, vec_ok);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const int row_a = warp * kRowsPerWarp + g;  // this lane's two rows within the CTA: row_a, row_a + 8
  uint32_t q_frag[kSteps][4];
  {
    const uint32_t* qa = reinterpret_cast<const uint32_t*>(q_s + row_a * kLd);
    const uint32_t* qb = reinterpret_cast<const uint32_t*>(q_s + (row_a + 8) * kLd);
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      q_frag[ks][0] = qa[ks * 8 + c];
      q_frag[ks][1] = qb[ks * 8 + c];
      q_frag[ks][2] = qa[ks * 8 + 4 + c];
      q_frag[ks][3] = qb[ks * 8 + 4 + c];
    }
  }
  __syncthreads();  // the key stages overwrite the q tile from here on

  auto load_tile = [&](int64_t tile, int stage) {
    const int64_t j0 = tile * kBlockN;
    load_rows<T, kDPad, kBlockN>(k_s + stage * kBlockN * kLd, k_src, p.k_stride_t, j0, p.k_len,
                                 dim, vec_ok);
    if (padded) {
      for (int x = threadIdx.x; x < kBlockN; x += kThreads) {
        const int64_t j = j0 + x;
        bias_s[stage * kBlockN + x] =
            j < p.k_len && p.key_padding[b * p.key_padding_stride_b + j * p.key_padding_stride_t]
                ? 0.f : -INFINITY;
      }
    }
  };
  if (tile_begin < tile_end) load_tile(tile_begin, 0);
  cp_async_commit();

  // Positions and key indices fit 32 bits (the launcher checks): per-key work stays 32-bit.
  int pos[2], row_lo[2], row_hi[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    pos[r] = static_cast<int>(q0 + row_a + 8 * r + off);
    int64_t rlo, rhi;
    p.key_range(pos[r], rlo, rhi);
    row_lo[r] = static_cast<int>(rlo);
    row_hi[r] = static_cast<int>(rhi < rlo ? rlo : rhi);
  }
  const int sink_end = static_cast<int>(p.sink_tokens < p.k_len ? p.sink_tokens : p.k_len);
  const float scale2 = p.scaling * kLog2e;
  // The warp's rows span [first row, first row + 15]: for whole-tile decisions.
  int64_t warp_lo_min, warp_hi_min, warp_lo_max, warp_hi_max;
  p.key_range(q0 + warp * kRowsPerWarp + off, warp_lo_min, warp_hi_min);
  p.key_range(q0 + warp * kRowsPerWarp + kRowsPerWarp - 1 + off, warp_lo_max, warp_hi_max);

  RowState st[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st[r].m_raw = st[r].m = -INFINITY;
    st[r].l = st[r].t = st[r].u = st[r].sink = 0.f;
    st[r].argmax = -1;
    st[r].self_raw = st[r].prev_raw = -INFINITY;
  }
  // The second product's accumulators: pk[n] = P~ K for head_dim columns 8n..8n+7, px = the
  // extra n-tile [P~ (j - j0), P~ 1, 0 x 6] (lane c == 0 holds its columns 0 and 1).
  constexpr int kPkTiles = kOnMma ? kDPad / 8 : 1;
  float pk[kPkTiles][4], px[4];
#pragma unroll
  for (int n = 0; n < kPkTiles; ++n) pk[n][0] = pk[n][1] = pk[n][2] = pk[n][3] = 0.f;
  px[0] = px[1] = px[2] = px[3] = 0.f;
  // B fragments of the extra n-tile, per 16-key step kk: column g of rows (keys) 2c, 2c + 1 and
  // 2c + 8, 2c + 9; column 0 holds the key offset j - j0 (exact in 16 bits), column 1 ones.
  uint32_t bx[kKeySteps][2];
#pragma unroll
  for (int kk = 0; kk < kKeySteps; ++kk) {
    const float k0 = static_cast<float>(16 * kk + 2 * c);
    bx[kk][0] = g == 0 ? pack2<T>(k0, k0 + 1.f) : g == 1 ? pack2<T>(1.f, 1.f) : 0u;
    bx[kk][1] = g == 0 ? pack2<T>(k0 + 8.f, k0 + 9.f) : g == 1 ? pack2<T>(1.f, 1.f) : 0u;
  }

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int stage = static_cast<int>((tile - tile_begin) & 1);
    if (tile + 1 < tile_end) {
      load_tile(tile + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int j0 = static_cast<int>(tile * kBlockN);
    // Warp-uniform: skip a tile none of the warp's rows sees; mask keys one by one only where the
    // tile crosses some row's range (or k_len), or under key padding.
    const bool warp_sees = warp_hi_max > j0 && warp_lo_min < j0 + kBlockN;
    const bool masked = padded || !(warp_lo_max <= j0 && warp_hi_min >= j0 + kBlockN);
    if (warp_sees) {
      const T* k_tile = k_s + stage * kBlockN * kLd;
      // Raw scores q.k: acc[n][2r + e] = row g + 8r, key j0 + 8n + 2c + e.
      float acc[kGroups][4];
#pragma unroll
      for (int n = 0; n < kGroups; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
        for (int np = 0; np < kGroups / 2; ++np) {
          // Matrices: keys 16np + 0..7 / + 8..15 (lane / 16), head_dim 16ks + 0..7 / 8..15
          // ((lane / 8) % 2): b0, b1 of n-tile 2np, then of 2np + 1.
          uint32_t kb[4];
          ldmatrix_x4<false>(kb, k_tile + (np * 16 + (lane / 16) * 8 + lane % 8) * kLd + ks * 16 +
                                     ((lane / 8) % 2) * 8);
          mma_16816<T>(acc[2 * np], q_frag[ks], kb[0], kb[1]);
          mma_16816<T>(acc[2 * np + 1], q_frag[ks], kb[2], kb[3]);
        }
      }
      if (masked) {
#pragma unroll
        for (int n = 0; n < kGroups; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e / 2, col = n * 8 + 2 * c + (e & 1), j = j0 + col;
            bool keep = j >= row_lo[r] && j < row_hi[r];
            if (padded) keep = keep && bias_s[stage * kBlockN + col] == 0.f;
            if (!keep) acc[n][e] = -INFINITY;
          }
        }
      }

      // The tile's max per row; on a rise (a warp vote), the first key holding it and the rescale.
      float tile_max[2];
      bool rises[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < kGroups; ++n) mx = fmaxf(mx, fmaxf(acc[n][2 * r], acc[n][2 * r + 1]));
        tile_max[r] = quad_max(mx);
        rises[r] = tile_max[r] > st[r].m_raw;  // false for a row that sees nothing here
      }
      if (__any_sync(0xffffffffu, rises[0] || rises[1])) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          int first = kBlockN;
          if (rises[r]) {
#pragma unroll
            for (int n = kGroups - 1; n >= 0; --n) {
              if (acc[n][2 * r + 1] == tile_max[r]) first = n * 8 + 2 * c + 1;
              if (acc[n][2 * r] == tile_max[r]) first = n * 8 + 2 * c;
            }
          }
          first = quad_min(first);  // every lane: the shuffle is outside the quad-uniform branches
          if (rises[r]) {
            RowState& rs = st[r];
            const float m_new = tile_max[r] * scale2;
            if (rs.m_raw > -INFINITY) {
              const float delta = rs.m - m_new, a = exp2_ftz(delta);
              if constexpr (!kOnMma) rs.t = a * (rs.t + delta * rs.l);
              rs.l *= a;
              rs.u *= a;
              rs.sink *= a;
              if constexpr (kOnMma) {
#pragma unroll
                for (int n = 0; n < kPkTiles; ++n) {
                  pk[n][2 * r] *= a;
                  pk[n][2 * r + 1] *= a;
                }
                px[2 * r] *= a;
                px[2 * r + 1] *= a;
              }
            }
            rs.m_raw = tile_max[r];
            rs.m = m_new;
            rs.argmax = j0 + first;
          }
        }
      }

#pragma unroll
      for (int r = 0; r < 2; ++r) {
        // The raw scores at j = i' and i' - 1, on the tile that holds them (masked keys: -inf).
        if (pos[r] >= j0 && pos[r] - 1 < j0 + kBlockN) {
#pragma unroll
          for (int n = 0; n < kGroups; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = j0 + n * 8 + 2 * c + e;
              if (j == pos[r]) st[r].self_raw = acc[n][2 * r + e];
              if (j == pos[r] - 1) st[r].prev_raw = acc[n][2 * r + e];
            }
          }
        }
      }

      // Weights, in place of the scores. m is -inf only for a row that has seen no key yet, whose
      // scores here are all -inf: shift by 0 so that w = 0, not NaN. The fma variant's tiles with
      // masked keys clamp (s2 - m) (a compile-time copy of the loop: no per-score test elsewhere).
      auto weights = [&](auto clamp) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          RowState& rs = st[r];
          const float m = rs.m > -INFINITY ? rs.m : 0.f;
          float lt = 0.f, vt = 0.f;  // this tile's sum w and (fma) sum w (8n + e)
#pragma unroll
          for (int n = 0; n < kGroups; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float d = fmaf(acc[n][2 * r + e], scale2, -m);
              if constexpr (decltype(clamp)::value) d = fmaxf(d, kExp2Floor);
              const float w = exp2_ftz(d);
              lt += w;
              if constexpr (!kOnMma) {
                rs.t = fmaf(w, d, rs.t);
                if (n * 8 + e != 0) vt = fmaf(w, static_cast<float>(n * 8 + e), vt);
              }
              acc[n][2 * r + e] = w;
            }
          }
          rs.l += lt;
          if constexpr (kOnMma) {
            (void)vt;
            rs.u = fmaf(static_cast<float>(pos[r] - j0), lt, rs.u);
          } else {
            rs.u = fmaf(static_cast<float>(pos[r] - j0 - 2 * c), lt, rs.u) - vt;
          }
        }
      };
      if (!kOnMma && masked) {
        weights(std::true_type{});
      } else {
        weights(std::false_type{});
      }

      if (j0 < sink_end) {  // CTA-uniform: the first tile or so
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int n = 0; n < kGroups; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              if (j0 + n * 8 + 2 * c + e < sink_end) st[r].sink += acc[n][2 * r + e];
            }
          }
        }
      }

      if constexpr (kOnMma) {
        // P~ [K | j - j0 | 1], 16 keys at a time: the weights' A fragments straight from acc
        // (rows g / g + 8, keys 16kk + 2c.. / + 8..), B by transposed ldmatrix of the key tile.
#pragma unroll
        for (int kk = 0; kk < kKeySteps; ++kk) {
          uint32_t w_hi[4], w_lo[4];
          split2<T>(acc[2 * kk][0], acc[2 * kk][1], w_hi[0], w_lo[0]);
          split2<T>(acc[2 * kk][2], acc[2 * kk][3], w_hi[1], w_lo[1]);
          split2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1], w_hi[2], w_lo[2]);
          split2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3], w_hi[3], w_lo[3]);
#pragma unroll
          for (int dn = 0; dn < kSteps; ++dn) {
            // Matrices: keys 16kk + 0..7 / + 8..15 ((lane / 8) % 2), head_dim 16dn + 0..7 /
            // 8..15 (lane / 16); transposed, they are b0, b1 of n-tile 2dn, then of 2dn + 1.
            uint32_t kb[4];
            ldmatrix_x4<true>(kb, k_tile + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kLd +
                                      dn * 16 + (lane / 16) * 8);
            mma_16816<T>(pk[2 * dn], w_hi, kb[0], kb[1]);
            mma_16816<T>(pk[2 * dn], w_lo, kb[0], kb[1]);
            mma_16816<T>(pk[2 * dn + 1], w_hi, kb[2], kb[3]);
            mma_16816<T>(pk[2 * dn + 1], w_lo, kb[2], kb[3]);
          }
          mma_16816<T>(px, w_hi, bx[kk][0], bx[kk][1]);
          mma_16816<T>(px, w_lo, bx[kk][0], bx[kk][1]);
        }
      }
    }
    __syncthreads();  // the stage just read is the next prefetch's destination
  }

  // Combine the quad's lanes and write rows g and g + 8 (lane c == 0 writes).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const RowState& rs = st[r];
    const float l = quad_sum(rs.l), u = quad_sum(rs.u), sink = quad_sum(rs.sink);
    const float self_raw = quad_max(rs.self_raw), prev_raw = quad_max(rs.prev_raw);
    float t_or_dot;
    if constexpr (kOnMma) {
      // q.(P~ K): this lane's head_dim columns 16ks + 2c.. (n-tile 2ks) and 16ks + 8 + 2c..
      // (n-tile 2ks + 1), against q_frag[ks][r] and q_frag[ks][2 + r] (row g + 8r).
      float dot = 0.f;
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        const float2 qa = unpack2<T>(q_frag[ks][r]), qb = unpack2<T>(q_frag[ks][2 + r]);
        dot = fmaf(qa.x, pk[2 * ks][2 * r], dot);
        dot = fmaf(qa.y, pk[2 * ks][2 * r + 1], dot);
        dot = fmaf(qb.x, pk[2 * ks + 1][2 * r], dot);
        dot = fmaf(qb.y, pk[2 * ks + 1][2 * r + 1], dot);
      }
      t_or_dot = quad_sum(dot);
    } else {
      t_or_dot = quad_sum(rs.t);
    }
    const int64_t i = q0 + row_a + 8 * r;
    if (c != 0 || i >= p.q_len) continue;
    float o[kNumAttentionStats];
    if (rs.m_raw > -INFINITY && l > 0.f) {
      const float log2_l = log2f(l);
      if constexpr (kOnMma) {
        // Lane c == 0 holds columns 0 and 1; the weight scale divides out of the entropy's ratio.
        const float pcol = px[2 * r] * (1.f / kWeightScale<T>), pone = px[2 * r + 1];
        o[kStatEntropy] = kLn2 * (log2_l - (t_or_dot * scale2 - rs.m * pone) / pone);
        o[kStatMeanDistance] = (u - pcol) / l;
      } else {
        o[kStatEntropy] = kLn2 * (log2_l - t_or_dot / l);
        o[kStatMeanDistance] = u / l;
      }
      o[kStatMaxWeight] = 1.f / l;
      o[kStatArgmax] = static_cast<float>(rs.argmax);
      o[kStatSinkMass] = sink / l;
      o[kStatSelfWeight] = exp2_ftz(fmaf(self_raw, scale2, -rs.m)) / l;
      o[kStatPrevWeight] = exp2_ftz(fmaf(prev_raw, scale2, -rs.m)) / l;
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

template <typename Kernel>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream,
                          const AttentionStatsProblem& p, bool vec_ok) {
#if defined(RECON_FAST_CUDA_EMULATION)
  (void)stream;
  return emu::launch(kernel, grid, kThreads, smem, p, vec_ok);
#else
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, smem, stream>>>(p, vec_ok);
  return cudaGetLastError();
#endif
}

template <typename T, int kDPad, bool kOnMma>
cudaError_t launch_for(const AttentionStatsProblem& p, cudaStream_t stream) {
  const size_t smem = tile_bytes<kDPad>() + sizeof(float) * 2 * kBlockN;
  // 16-byte copies need head_dim, the row strides and the bases in whole 16-byte units.
  constexpr int64_t kPer = 16 / sizeof(T);
  const bool vec_ok = p.head_dim % kPer == 0 && p.q_stride_t % kPer == 0 &&
                      p.k_stride_t % kPer == 0 && p.q_stride_h % kPer == 0 &&
                      p.k_stride_h % kPer == 0 && p.q_stride_b % kPer == 0 &&
                      p.k_stride_b % kPer == 0 && reinterpret_cast<uintptr_t>(p.q) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(p.k) % 16 == 0;
  const dim3 grid(static_cast<unsigned>((p.q_len + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  return launch_kernel(attention_stats_mma_kernel<T, kDPad, kOnMma>, grid, smem, stream, p, vec_ok);
}

template <typename T, bool kOnMma>
cudaError_t launch_for_dim(const AttentionStatsProblem& p, cudaStream_t stream) {
  // head_dim padded to the next instantiated multiple of 16 (zeros beyond head_dim).
  if (p.head_dim <= 32) return launch_for<T, 32, kOnMma>(p, stream);
  if (p.head_dim <= 64) return launch_for<T, 64, kOnMma>(p, stream);
  if (p.head_dim <= 80) return launch_for<T, 80, kOnMma>(p, stream);
  if (p.head_dim <= 96) return launch_for<T, 96, kOnMma>(p, stream);
  if (p.head_dim <= 128) return launch_for<T, 128, kOnMma>(p, stream);
  if constexpr (!kOnMma) {
    if (p.head_dim <= 256) return launch_for<T, 256, false>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_for_dtype(const AttentionStatsProblem& p, bool on_mma, cudaStream_t stream) {
  // The second product's accumulators outgrow the registers beyond head_dim 128: fma there.
  if (on_mma && p.head_dim <= kMaxMmaHeadDim) return launch_for_dim<T, true>(p, stream);
  return launch_for_dim<T, false>(p, stream);
}

}  // namespace

bool attention_stats_mma_applies(const AttentionStatsProblem& p) {
  return (p.dtype == StatsDtype::BFloat16 || p.dtype == StatsDtype::Float16) &&
         p.softcap <= 0.f && p.mask_kind == AttentionMaskKind::None && p.scaling > 0.f &&
         p.head_dim <= kAttentionMaxHeadDim;
}

cudaError_t launch_attention_stats_mma(const AttentionStatsProblem& p, bool on_mma,
                                       cudaStream_t stream) {
  if (!attention_stats_mma_applies(p)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.heads == 0 || p.q_len == 0) return cudaSuccess;
  if (p.k_len >= 0x7fffffffLL - 2 * kBlockN || p.q_len >= 0x7fffffffLL || p.heads > 65535 ||
      p.batch > 65535)
    return cudaErrorInvalidValue;  // 32-bit key positions, grid limits
  if (p.dtype == StatsDtype::BFloat16) return launch_for_dtype<__nv_bfloat16>(p, on_mma, stream);
  return launch_for_dtype<__half>(p, on_mma, stream);
}

}  // namespace recon_fast::cuda
