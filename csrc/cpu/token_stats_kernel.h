// The CPU token_stats kernel, written once with at::vec::Vectorized and compiled once per
// instruction set (token_stats_default.cpp, token_stats_avx2.cpp): each file sets CPU_CAPABILITY
// before including this header, as ATen's own per-capability kernels do, so the Vectorized types
// and these functions land in a distinct inline namespace in each object.
//
// Numerics. Fast path, one read of the row: shifted sums around K = the row's first element,
// s1 = sum(x - K), s2 = sum((x - K)^2), plus min and max; then mean = K + s1/n and
// M2 = s2 - s1^2/n. Shifting by a value inside the row removes the catastrophic cancellation of
// the plain sum-of-squares formula (rows such as mean 1e4, std 1e-2 keep their digits); what is
// left is a relative error of about eps * (1 + n (mean - K)^2 / M2), small unless K is an outlier
// of its row. That ratio is known at the end, so rows where it exceeds kMaxShiftRatio (the first
// element is far out in the tail, e.g. a massive-activation channel) are recomputed with the
// corrected two-pass method (Chan, Golub & LeVeque 1983) from cache: chunk by chunk, the chunk's
// mean m, then sum(x - m) and sum((x - m)^2), chunks merged with Chan's formula.
// Vector partial sums are flushed per chunk into a wider scalar, so long rows do not pile up
// rounding in one float lane.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../token_stats_problem.h"

namespace recon_fast {
namespace cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Elements per chunk: the span summed in vector registers before the flush (and, on the two-pass
// path, 16 KiB of float32 that stays in L1 between its two passes).
constexpr int64_t kChunk = 4096;

// Largest n (mean - K)^2 / M2 the shifted formula may see: the relative error of M2 is then below
// about 33 float32 epsilons (4e-6), inside the 1e-5 we promise.
constexpr double kMaxShiftRatio = 32.0;

template <typename acc_t>
struct ChunkSums {
  acc_t s1, s2, lo, hi;
};

// Loads Vectorized<acc_t> values from a row of scalar_t, widening half types on the fly: one
// Vectorized<half_t> load gives two float vectors.
template <typename scalar_t, typename acc_t>
struct WideLoad {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();
  static_assert(std::is_same_v<scalar_t, acc_t> || Vectorized<scalar_t>::size() == kStep,
                "one half-type load widens to exactly two acc vectors");
  static inline void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    } else {
      std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    }
  }
};

// One chunk of the fast path: shifted sums and min/max, in one read.
template <typename scalar_t, typename acc_t>
ChunkSums<acc_t> shifted_chunk(const scalar_t* x, int64_t n, acc_t shift) {
  using Vec = Vectorized<acc_t>;
  using Load = WideLoad<scalar_t, acc_t>;
  constexpr int64_t kPair = Load::kStep;  // elements per Load::load (two vectors' worth)
  const Vec neg_k(-shift), one(acc_t(1));
  // Two chains per sum hide the add/FMA latency; min/max fold a pair first, so four vectors cost
  // one step of their chains. More chains would spill AVX2's 16 registers into the loop-carried
  // path. min/max use compare-select: rows holding NaN never reach the end of this path.
  Vec a0(0), a1(0), q0(0), q1(0);
  Vec lo(std::numeric_limits<acc_t>::infinity()), hi(-std::numeric_limits<acc_t>::infinity());
  int64_t i = 0;
  for (; i + 2 * kPair <= n; i += 2 * kPair) {
    Vec v0, v1, v2, v3;
    Load::load(x + i, v0, v1);
    Load::load(x + i + kPair, v2, v3);
    lo = at::vec::clamp_max(lo, at::vec::clamp_max(at::vec::clamp_max(v0, v1),
                                                   at::vec::clamp_max(v2, v3)));
    hi = at::vec::clamp_min(hi, at::vec::clamp_min(at::vec::clamp_min(v0, v1),
                                                   at::vec::clamp_min(v2, v3)));
    // x*1 - K and acc + d*1 are exact; written as FMAs they run on the multiply ports, which
    // min/max and add leave idle on x86 (Zen: FP0/1 vs FP2/3).
    v0 = at::vec::fmadd(v0, one, neg_k), v1 = at::vec::fmadd(v1, one, neg_k);
    v2 = at::vec::fmadd(v2, one, neg_k), v3 = at::vec::fmadd(v3, one, neg_k);
    a0 = at::vec::fmadd(v0, one, a0), a1 = at::vec::fmadd(v1, one, a1);
    a0 = at::vec::fmadd(v2, one, a0), a1 = at::vec::fmadd(v3, one, a1);
    q0 = at::vec::fmadd(v0, v0, q0), q1 = at::vec::fmadd(v1, v1, q1);
    q0 = at::vec::fmadd(v2, v2, q0), q1 = at::vec::fmadd(v3, v3, q1);
  }
  constexpr int64_t W = Vec::size();
  alignas(64) acc_t ab[W], qb[W], lb[W], hb[W];
  (a0 + a1).store(ab);
  (q0 + q1).store(qb);
  lo.store(lb);
  hi.store(hb);
  ChunkSums<acc_t> r{0, 0, lb[0], hb[0]};
  for (int64_t j = 0; j < W; ++j) {
    r.s1 += ab[j], r.s2 += qb[j];
    r.lo = std::min(r.lo, lb[j]), r.hi = std::max(r.hi, hb[j]);
  }
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    const acc_t d = v - shift;
    r.s1 += d, r.s2 += d * d;
    r.lo = std::min(r.lo, v), r.hi = std::max(r.hi, v);
  }
  return r;
}

// Chan's merge of (count, mean, M2) triples.
template <typename acc_t>
struct Moments {
  acc_t n = 0, mean = 0, m2 = 0;

  void merge(acc_t nb, acc_t mean_b, acc_t m2_b) {
    if (n == 0) {
      n = nb, mean = mean_b, m2 = m2_b;
      return;
    }
    const acc_t total = n + nb;
    const acc_t delta = mean_b - mean;
    mean += delta * (nb / total);
    m2 += m2_b + delta * delta * (n * nb / total);
    n = total;
  }
};

// The careful path: corrected two-pass per chunk (the chunk widened into `staging` first for
// half types), chunks merged with Chan's formula. Returns (mean, M2) of the row.
template <typename scalar_t, typename acc_t>
Moments<acc_t> two_pass_moments(const scalar_t* x, int64_t n, acc_t* staging) {
  Moments<acc_t> mom;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = std::min(kChunk, n - c0);
    const acc_t* chunk;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      chunk = x + c0;
    } else {
      for (int64_t i = 0; i < len; ++i) staging[i] = static_cast<acc_t>(x[c0 + i]);
      chunk = staging;
    }
    const acc_t cnt = static_cast<acc_t>(len);
    const ChunkSums<acc_t> first = shifted_chunk<acc_t, acc_t>(chunk, len, acc_t(0));
    const acc_t m = first.s1 / cnt;
    const ChunkSums<acc_t> centred = shifted_chunk<acc_t, acc_t>(chunk, len, m);
    mom.merge(cnt, m + centred.s1 / cnt,
              std::max(centred.s2 - centred.s1 * centred.s1 / cnt, acc_t(0)));
  }
  return mom;
}

// Rows holding NaN or Inf (or whose sums overflow): computed plainly, as torch would, so that
// mean is +-inf or NaN, std NaN, energy inf/NaN and min/max NaN-propagating, for that row alone.
template <typename scalar_t, typename acc_t>
void non_finite_row(const scalar_t* x, int64_t n, float* out, int64_t os) {
  acc_t sum = 0, sumsq = 0;
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -lo;
  bool has_nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    sum += v, sumsq += v * v;
    has_nan |= std::isnan(v);
    lo = std::min(lo, v), hi = std::max(hi, v);
  }
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  out[kStatEnergy * os] = static_cast<float>(std::sqrt(sumsq));
  out[kStatMean * os] = static_cast<float>(sum / static_cast<acc_t>(n));
  out[kStatStd * os] = static_cast<float>(nan);
  out[kStatMin * os] = static_cast<float>(has_nan ? nan : lo);
  out[kStatMax * os] = static_cast<float>(has_nan ? nan : hi);
}

template <typename scalar_t, typename acc_t>
void token_stats_row(const scalar_t* x, int64_t n, float* out, int64_t os, acc_t* staging) {
  // Per-chunk partial sums are added in double: a handful of scalar adds per 4096 elements.
  using wide_t = double;
  const acc_t shift = static_cast<acc_t>(x[0]);
  wide_t s1 = 0, s2 = 0;
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -lo;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const ChunkSums<acc_t> c = shifted_chunk<scalar_t, acc_t>(x + c0, std::min(kChunk, n - c0), shift);
    s1 += c.s1, s2 += c.s2;
    lo = std::min(lo, c.lo), hi = std::max(hi, c.hi);
  }
  if (!std::isfinite(s1) || !std::isfinite(s2) || !std::isfinite(static_cast<wide_t>(shift))) {
    non_finite_row<scalar_t, acc_t>(x, n, out, os);
    return;
  }
  const wide_t cnt = static_cast<wide_t>(n);
  const wide_t offset_sq = s1 * s1 / cnt;  // n (mean - K)^2
  wide_t mean = static_cast<wide_t>(shift) + s1 / cnt;
  wide_t m2 = s2 - offset_sq;
  if (offset_sq > kMaxShiftRatio * m2) {  // K was an outlier: redo the moments carefully
    const Moments<acc_t> mom = two_pass_moments<scalar_t, acc_t>(x, n, staging);
    mean = mom.mean, m2 = mom.m2;
  }
  m2 = std::max(m2, wide_t(0));
  out[kStatEnergy * os] = static_cast<float>(std::sqrt(m2 + cnt * mean * mean));
  out[kStatMean * os] = static_cast<float>(mean);
  // n == 1 gives 0/0 = NaN, as torch.std with correction=1.
  out[kStatStd * os] = static_cast<float>(std::sqrt(m2 / (cnt - 1)));
  out[kStatMin * os] = static_cast<float>(lo);
  out[kStatMax * os] = static_cast<float>(hi);
}

template <typename scalar_t, typename acc_t>
void token_stats_rows_typed(const TokenStatsProblem& p, int64_t begin, int64_t end) {
  const auto* x = static_cast<const scalar_t*>(p.x);
  // Scratch for the two-pass path of half types; unused (and tiny) otherwise.
  alignas(64) acc_t staging[std::is_same_v<scalar_t, acc_t> ? 1 : kChunk];
  for (int64_t r = begin; r < end; ++r) {
    token_stats_row<scalar_t, acc_t>(x + p.x_rows.offset(r), p.dim, p.out + p.out_rows.offset(r),
                                     p.out_stat_stride, staging);
  }
}

// Entry point of one capability: rows [begin, end) of p.
inline void token_stats_rows(const TokenStatsProblem& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case StatsDtype::Float32: return token_stats_rows_typed<float, float>(p, begin, end);
    case StatsDtype::Float64: return token_stats_rows_typed<double, double>(p, begin, end);
    case StatsDtype::Float16: return token_stats_rows_typed<c10::Half, float>(p, begin, end);
    case StatsDtype::BFloat16: return token_stats_rows_typed<c10::BFloat16, float>(p, begin, end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace recon_fast
