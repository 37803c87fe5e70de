// The row reduction of the CUDA token_stats kernels, shared by the one-tensor launch
// (token_stats_kernel.cu) and the grouped one (token_stats_grouped.cu), so that a row gives the
// same bits whichever launch reduced it: one read of each element, 128-bit loads, fp32
// accumulation (fp64 for fp64 input), a group of 4..32 lanes per row for rows up to 4096 elements
// (sized so every lane folds several packs) and a block per row for longer ones.
//
// Each thread folds its elements in packs (the 8 bf16/fp16, 4 fp32 or 2 fp64 of one 128-bit
// load): a pack's own mean and centred M2 are computed in registers on values shifted by the
// row's first element (so a large mean with a small spread keeps its digits: 1e4 +- 1e-2 in
// float32), and packs merge into the thread's running moments with Chan's formula, as do lanes
// across the group (shuffles) and warps across the block (shared memory). The sum of squares is
// kept apart for the energy. Rows holding Inf/NaN are recognised from min/max and the sum of
// squares, and get torch's answers (mean +-inf/NaN, std NaN) for that row alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../token_stats_problem.h"

namespace recon_fast::cuda::reduce {

constexpr int kWarp = 32;

// Short rows: a group of lanes per row, this many warps per block. Long rows: a block per row.
constexpr int kWarpsPerGroupBlock = 4;
constexpr int kGroupBlockThreads = kWarpsPerGroupBlock * kWarp;
constexpr int64_t kGroupPerRowMaxDim = 4096;

template <typename T> __device__ __forceinline__ float to_acc(T v);
template <> __device__ __forceinline__ float to_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
__device__ __forceinline__ double to_acc_d(double v) { return v; }

// mean and m2 are of the values minus the row's shift; sumsq, lo and hi of the values themselves.
template <typename acc_t>
struct Moments {
  acc_t n, mean, m2, sumsq, lo, hi;

  __device__ __forceinline__ static Moments empty() {
    Moments m;
    m.n = m.mean = m.m2 = m.sumsq = acc_t(0);
    m.lo = acc_t(INFINITY);
    m.hi = acc_t(-INFINITY);
    return m;
  }

  // Chan's merge of (n, mean, M2); the other fields add or compare.
  __device__ __forceinline__ void merge(const Moments& b) {
    if (b.n == acc_t(0)) return;
    if (n == acc_t(0)) {
      *this = b;
      return;
    }
    const acc_t total = n + b.n;
    const acc_t delta = b.mean - mean;
    const acc_t wb = b.n / total;
    mean += delta * wb;
    m2 += b.m2 + delta * delta * n * wb;
    n = total;
    sumsq += b.sumsq;
    lo = lo < b.lo ? lo : b.lo;
    hi = hi > b.hi ? hi : b.hi;
  }
};

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename T>
__device__ __forceinline__ typename AccOf<T>::type widen(T v) {
  if constexpr (sizeof(T) == 8) return to_acc_d(v);
  else return to_acc<T>(v);
}

// The moments of N values held in registers, mean and M2 taken around `shift`.
template <typename acc_t, int N>
__device__ __forceinline__ Moments<acc_t> pack_moments(const acc_t (&v)[N], acc_t shift) {
  Moments<acc_t> m;
  acc_t sum = 0, sq = 0, lo = v[0], hi = v[0];
  acc_t d[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    d[i] = v[i] - shift;
    sum += d[i];
    sq += v[i] * v[i];
    lo = v[i] < lo ? v[i] : lo;
    hi = v[i] > hi ? v[i] : hi;
  }
  const acc_t mean = sum * (acc_t(1) / acc_t(N));
  acc_t m2 = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) m2 += (d[i] - mean) * (d[i] - mean);
  m.n = acc_t(N), m.mean = mean, m.m2 = m2, m.sumsq = sq, m.lo = lo, m.hi = hi;
  return m;
}

template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  // Read-only, 128-bit: x is never written by this kernel.
  const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<T> pk;
  static_assert(sizeof(Pack<T>) == sizeof(uint4), "a pack is one 128-bit load");
  *reinterpret_cast<uint4*>(&pk) = bits;
  return pk;
}

template <typename T, typename acc_t>
__device__ __forceinline__ void fold_pack(Moments<acc_t>& s, const Pack<T>& pk, acc_t shift) {
  acc_t v[Pack<T>::N];
#pragma unroll
  for (int i = 0; i < Pack<T>::N; ++i) v[i] = widen<T>(pk.v[i]);
  s.merge(pack_moments<acc_t, Pack<T>::N>(v, shift));
}

template <typename T, typename acc_t>
__device__ __forceinline__ void fold_scalar(Moments<acc_t>& s, T value, acc_t shift) {
  acc_t v[1] = {widen<T>(value)};
  s.merge(pack_moments<acc_t, 1>(v, shift));
}

// Folds this thread's share of a row: elements are dealt to `nthreads` threads pack by pack.
// The shift is the row's first element: every thread reads it (one cached load).
template <typename T, typename acc_t, bool kVectorized>
__device__ __forceinline__ Moments<acc_t> fold_row_share(const T* x, int64_t dim, int tid,
                                                         int nthreads) {
  Moments<acc_t> s = Moments<acc_t>::empty();
  const acc_t shift = widen<T>(x[0]);
  int64_t tail_start = 0;
  if constexpr (kVectorized) {
    constexpr int N = Pack<T>::N;
    const int64_t packs = dim / N;
    int64_t k = tid;
    // Four loads in flight per thread before any arithmetic: memory-level parallelism.
    for (; k + 3 * nthreads < packs; k += 4 * nthreads) {
      Pack<T> a[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) a[u] = load_pack<T>(x + (k + u * nthreads) * N);
#pragma unroll
      for (int u = 0; u < 4; ++u) fold_pack<T, acc_t>(s, a[u], shift);
    }
    for (; k < packs; k += nthreads) fold_pack<T, acc_t>(s, load_pack<T>(x + k * N), shift);
    tail_start = packs * N;
  }
  for (int64_t i = tail_start + tid; i < dim; i += nthreads) fold_scalar<T, acc_t>(s, x[i], shift);
  return s;
}

template <typename acc_t>
__device__ __forceinline__ acc_t shfl_xor(acc_t v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

// Merges the moments of `kLanes` consecutive lanes (an aligned group within the warp); every
// lane of the warp must take part, since the shuffles name the whole warp.
template <int kLanes = kWarp, typename acc_t>
__device__ __forceinline__ void group_merge(Moments<acc_t>& s) {
#pragma unroll
  for (int mask = kLanes / 2; mask > 0; mask >>= 1) {
    Moments<acc_t> o;
    o.n = shfl_xor(s.n, mask);
    o.mean = shfl_xor(s.mean, mask);
    o.m2 = shfl_xor(s.m2, mask);
    o.sumsq = shfl_xor(s.sumsq, mask);
    o.lo = shfl_xor(s.lo, mask);
    o.hi = shfl_xor(s.hi, mask);
    s.merge(o);
  }
}

template <typename acc_t>
__device__ __forceinline__ void write_stats(const Moments<acc_t>& s, acc_t shift, float* out,
                                            int64_t os) {
  const acc_t nan = acc_t(NAN), inf = acc_t(INFINITY);
  // NaN squared stays NaN (Inf squared does not); min/max skip NaN but keep +-Inf.
  const bool has_nan = isnan(s.sumsq) || isnan(shift);
  const bool has_pos_inf = s.hi == inf, has_neg_inf = s.lo == -inf;
  out[kStatEnergy * os] = static_cast<float>(sqrt(s.sumsq));
  // Non-finite rows: what torch's sum / n gives (NaN, or the one infinity present).
  const acc_t mean = has_nan || (has_pos_inf && has_neg_inf) ? nan
                     : has_pos_inf                          ? inf
                     : has_neg_inf                          ? -inf
                                                            : shift + s.mean;
  out[kStatMean * os] = static_cast<float>(mean);
  const bool finite = !has_nan && !has_pos_inf && !has_neg_inf;
  // n == 1 gives 0/0 = NaN, as torch.std with correction=1.
  out[kStatStd * os] = static_cast<float>(finite ? sqrt((s.m2 > acc_t(0) ? s.m2 : acc_t(0)) / (s.n - 1)) : nan);
  out[kStatMin * os] = static_cast<float>(has_nan ? nan : s.lo);
  out[kStatMax * os] = static_cast<float>(has_nan ? nan : s.hi);
}

// The rows of one lane-group block: row `block * rows_per_block + threadIdx.x / kLanes` of a
// launch's `rows` rows, each reduced by kLanes lanes. x_row(r) and out_row(r) give where row r
// is read and written (out_row's stats `os` floats apart).
template <typename T, bool kVectorized, int kLanes, typename XRow, typename OutRow>
__device__ __forceinline__ void rows_by_lane_groups(int64_t rows, int64_t dim, XRow x_row, OutRow out_row,
                                                    int64_t os, int64_t block) {
  using acc_t = typename AccOf<T>::type;
  const int lane = threadIdx.x % kLanes;
  const int64_t row = block * (blockDim.x / kLanes) + threadIdx.x / kLanes;
  // Lanes past the last row still take part in the shuffles (the group's neighbours need them).
  const bool active = row < rows;
  const T* x = active ? x_row(row) : nullptr;
  Moments<acc_t> s = active ? fold_row_share<T, acc_t, kVectorized>(x, dim, lane, kLanes)
                            : Moments<acc_t>::empty();
  group_merge<kLanes>(s);
  if (active && lane == 0) write_stats(s, widen<T>(x[0]), out_row(row), os);
}

// One row reduced by the whole block; `partial` is the block's shared scratch.
template <typename T, bool kVectorized>
__device__ __forceinline__ void row_by_block(const T* x, int64_t dim, float* out, int64_t os,
                                             Moments<typename AccOf<T>::type>* partial) {
  using acc_t = typename AccOf<T>::type;
  Moments<acc_t> s = fold_row_share<T, acc_t, kVectorized>(x, dim, threadIdx.x, blockDim.x);
  group_merge(s);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarp;
    s = lane < warps ? partial[lane] : Moments<acc_t>::empty();
    group_merge(s);
    if (lane == 0) write_stats(s, widen<T>(x[0]), out, os);
  }
}

constexpr int kMaxBlockThreads = 1024;

// Threads per row for the block-per-row kernel, by row length: enough packs per thread to keep
// loads in flight, few enough threads that the final merge stays cheap.
inline int block_threads_for(int64_t dim) {
  if (dim <= 16384) return 256;
  if (dim <= 65536) return 512;
  return 1024;
}

// Whether every row of p starts on a 16-byte boundary (then rows are read in 128-bit packs).
inline bool rows_are_16B_aligned(const TokenStatsProblem& p, int64_t element_size) {
  if (reinterpret_cast<uintptr_t>(p.x) % 16 != 0) return false;
  for (int d = 0; d < p.x_rows.ndim; ++d) {
    if ((p.x_rows.strides[d] * element_size) % 16 != 0) return false;
  }
  return true;
}

// Lanes per row for rows up to kGroupPerRowMaxDim: about 8 packs per lane, so the loads in flight
// and the shuffle merge are paid for by enough data (576 bf16 values: 8 lanes of 9 packs, where
// a whole warp left most lanes idle in the last round).
inline int lanes_per_row(int64_t dim, int pack) {
  const int64_t packs = dim / pack;
  if (packs >= 8 * 32) return 32;
  if (packs >= 8 * 16) return 16;
  if (packs >= 8 * 8) return 8;
  return 4;
}

// Bytes of one element of `dtype`.
inline int64_t element_size(StatsDtype dtype) {
  switch (dtype) {
    case StatsDtype::Float64: return 8;
    case StatsDtype::Float16:
    case StatsDtype::BFloat16: return 2;
    case StatsDtype::Float32: break;
  }
  return 4;
}

}  // namespace recon_fast::cuda::reduce
