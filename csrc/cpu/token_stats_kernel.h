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
#include <ATen/cpu/vec/functional.h>
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

// The folds of fold_lanes, on vectors and on lanes (min/max by compare-select, as in the loop).
struct Sum {
  template <typename T> T operator()(const T& a, const T& b) const { return a + b; }
};
struct Min {
  template <typename T> Vectorized<T> operator()(const Vectorized<T>& a, const Vectorized<T>& b) const {
    return at::vec::clamp_max(a, b);
  }
  template <typename T> T operator()(const T& a, const T& b) const { return std::min(a, b); }
};
struct Max {
  template <typename T> Vectorized<T> operator()(const Vectorized<T>& a, const Vectorized<T>& b) const {
    return at::vec::clamp_min(a, b);
  }
  template <typename T> T operator()(const T& a, const T& b) const { return std::max(a, b); }
};

// The lanes of v folded into one value with op. ATen's shuffle-based fold exists for float under
// AVX2/AVX-512 (a little faster than a store and a loop, ~2 ns a row); for other types and the
// baseline build its generic version stores and reloads lane by lane (3x slower for double), so
// they keep the store and the scalar loop. Only finite values reach here (NaN rows are redone).
template <typename acc_t, typename Op>
inline acc_t fold_lanes(const Vectorized<acc_t>& v, Op op) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return at::vec::vec_reduce_all<acc_t>([&](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) { return op(a, b); },
                                          v);
  }
#endif
  constexpr int64_t W = Vectorized<acc_t>::size();
  alignas(64) acc_t lanes[W];
  v.store(lanes);
  acc_t r = lanes[0];
  for (int64_t j = 1; j < W; ++j) r = op(r, lanes[j]);
  return r;
}

// One chunk of the fast path: shifted sums and min/max, in one read.
template <typename scalar_t, typename acc_t>
ChunkSums<acc_t> shifted_chunk(const scalar_t* x, int64_t n, acc_t shift) {
  using Vec = Vectorized<acc_t>;
  using Load = WideLoad<scalar_t, acc_t>;
  constexpr int64_t kPair = Load::kStep;  // elements per Load::load (two vectors' worth)
  const Vec neg_k(-shift), one(acc_t(1));
  // The loop is bound by its floating-point ops (5 per vector), not by their latency: the sum adds
  // a pair before its chain (two chains, one FMA each per step), the squares have a chain per
  // vector, and min/max fold the four vectors before theirs. 14 vectors are live, inside AVX2's
  // 16 registers. min/max use compare-select: rows holding NaN never reach the end of this path.
  Vec a0(0), a1(0), q0(0), q1(0), q2(0), q3(0);
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
    a0 = at::vec::fmadd(v0 + v2, one, a0), a1 = at::vec::fmadd(v1 + v3, one, a1);
    q0 = at::vec::fmadd(v0, v0, q0), q1 = at::vec::fmadd(v1, v1, q1);
    q2 = at::vec::fmadd(v2, v2, q2), q3 = at::vec::fmadd(v3, v3, q3);
  }
  ChunkSums<acc_t> r{fold_lanes(a0 + a1, Sum{}), fold_lanes((q0 + q2) + (q1 + q3), Sum{}), fold_lanes(lo, Min{}),
                     fold_lanes(hi, Max{})};
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

// The one-read sums of a row, shifted around its first element (the fast path's input).
template <typename acc_t>
struct RowSums {
  double s1, s2;
  acc_t shift, lo, hi;
};

template <typename scalar_t, typename acc_t>
inline RowSums<acc_t> row_sums(const scalar_t* x, int64_t n) {
  // Per-chunk partial sums are added in double: a handful of scalar adds per 4096 elements.
  RowSums<acc_t> r{0, 0, static_cast<acc_t>(x[0]), std::numeric_limits<acc_t>::infinity(),
                   -std::numeric_limits<acc_t>::infinity()};
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const ChunkSums<acc_t> c = shifted_chunk<scalar_t, acc_t>(x + c0, std::min(kChunk, n - c0), r.shift);
    r.s1 += c.s1, r.s2 += c.s2;
    r.lo = std::min(r.lo, c.lo), r.hi = std::max(r.hi, c.hi);
  }
  return r;
}

// Rows whose statistics are finished together: the fast path's last steps (two square roots, a
// few products) run in Vectorized<double> over the block instead of once per row. On rows of a
// few hundred elements those steps, done per row, were a third of the time.
constexpr int64_t kRowBlock = 16;

template <typename scalar_t, typename acc_t>
void token_stats_rows_typed(const TokenStatsProblem& p, int64_t begin, int64_t end) {
  using VecD = Vectorized<double>;
  static_assert(kRowBlock % VecD::size() == 0, "a block is whole double vectors");
  const auto* x = static_cast<const scalar_t*>(p.x);
  const int64_t n = p.dim;
  const double cnt = static_cast<double>(n);
  // Reciprocals once per call: a product per row instead of three divisions. n == 1 gives
  // inv_n1 = inf and std = sqrt(0 * inf) = NaN, as torch.std with correction=1.
  const double inv_n = 1.0 / cnt, inv_n1 = 1.0 / (cnt - 1);
  const int64_t os = p.out_stat_stride;
  // Scratch for the two-pass path of half types; unused (and tiny) otherwise.
  alignas(64) acc_t staging[std::is_same_v<scalar_t, acc_t> ? 1 : kChunk];
  RowSums<acc_t> sums[kRowBlock];
  alignas(64) double s1[kRowBlock] = {}, s2[kRowBlock] = {}, shift[kRowBlock] = {};
  alignas(64) double mean[kRowBlock], energy[kRowBlock], stdev[kRowBlock];
  for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
    const int64_t count = std::min(kRowBlock, end - r0);
    for (int64_t j = 0; j < count; ++j) {
      sums[j] = row_sums<scalar_t, acc_t>(x + p.x_rows.offset(r0 + j), n);
      s1[j] = sums[j].s1, s2[j] = sums[j].s2, shift[j] = static_cast<double>(sums[j].shift);
    }
    // mean = K + s1/n, M2 = s2 - s1^2/n (clamped at 0), energy = sqrt(M2 + n mean^2),
    // std = sqrt(M2 / (n - 1)). Lanes past `count` hold an earlier block's rows (or zeros):
    // computed and never stored.
    const VecD v_inv_n(inv_n), v_inv_n1(inv_n1), v_cnt(cnt), zero(0.0);
    for (int64_t j = 0; j < count; j += VecD::size()) {
      const VecD a = VecD::loadu(s1 + j), q = VecD::loadu(s2 + j);
      const VecD m = VecD::loadu(shift + j) + a * v_inv_n;
      const VecD m2 = at::vec::maximum(q - a * a * v_inv_n, zero);
      m.store(mean + j);
      (m2 + v_cnt * m * m).sqrt().store(energy + j);
      (m2 * v_inv_n1).sqrt().store(stdev + j);
    }
    for (int64_t j = 0; j < count; ++j) {
      const scalar_t* row = x + p.x_rows.offset(r0 + j);
      float* out = p.out + p.out_rows.offset(r0 + j);
      if (!std::isfinite(s1[j]) || !std::isfinite(s2[j]) || !std::isfinite(shift[j])) {
        non_finite_row<scalar_t, acc_t>(row, n, out, os);
        continue;
      }
      const double offset_sq = s1[j] * s1[j] * inv_n;  // n (mean - K)^2
      if (offset_sq > kMaxShiftRatio * (s2[j] - offset_sq)) {  // K was an outlier: redo it carefully
        const Moments<acc_t> mom = two_pass_moments<scalar_t, acc_t>(row, n, staging);
        const double m2 = std::max(static_cast<double>(mom.m2), 0.0);
        mean[j] = mom.mean;
        energy[j] = std::sqrt(m2 + cnt * mean[j] * mean[j]);
        stdev[j] = std::sqrt(m2 * inv_n1);
      }
      out[kStatEnergy * os] = static_cast<float>(energy[j]);
      out[kStatMean * os] = static_cast<float>(mean[j]);
      out[kStatStd * os] = static_cast<float>(stdev[j]);
      out[kStatMin * os] = static_cast<float>(sums[j].lo);
      out[kStatMax * os] = static_cast<float>(sums[j].hi);
    }
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
