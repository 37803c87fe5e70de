// The CPU attention_stats kernel, written once with at::vec::Vectorized and compiled once per
// instruction set (attention_stats_default.cpp, attention_stats_avx2.cpp), like token_stats.
//
// Work item: one (batch, head) and kAttnItemRows queries. Their key range (causal diagonal and
// window already cut away, whole blocks skipped) is walked block by block; for each packed block
// of kAttnKeyBlock keys, a register-blocked micro-kernel computes the scores of kTileRows queries
// (kTileRows x 2 vectors of accumulators, FMA over head_dim with one broadcast of q per row), and
// the online update consumes that small tile straight from L1: no [q_len, k_len] tile exists.
//
// Online update of one query row over a block of scores s (already scaled, soft-capped, masked):
//   m  running max;  l = sum e^(s-m);  t = sum e^(s-m) (s-m);  u = sum e^(s-m) (i' - j)
// When a block raises the max from m to m', everything is rescaled by a = e^(m-m'); t also
// shifts, since (s - m') = (s - m) + (m - m'):  t' = a (t + (m - m') l).  At the end
//   lse = m + log l,  entropy = log l - t / l,  max_weight = 1 / l,  mean_distance = u / l.
// l, t, u are kept per vector lane and reduced once per row; the sink sum is a scalar (it only
// sees the first blocks) and self/prev keep their raw score until the end.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../attention_stats_problem.h"
#include "attention_stats_cpu.h"

namespace recon_fast {
namespace cpu {
inline namespace CPU_CAPABILITY {

using FVec = at::vec::Vectorized<float>;

constexpr int kLanes = FVec::size();
// Query rows per micro-kernel: kTileRows x 2 accumulator vectors, plus two key vectors and one
// broadcast, fill the register file without spilling (AVX2: 6 x 2 + 3 = 15 of 16 registers).
constexpr int kTileRows = kLanes >= 16 ? 12 : 6;
static_assert(kAttnKeyBlock % (2 * kLanes) == 0, "a key block is whole pairs of vectors");
static_assert(kAttnItemRows % kTileRows == 0, "an item is whole micro-tiles");

// Scores below m - kExpFloor contribute nothing (e^-100 is 0 in float32); clamping there keeps
// (s - m) finite for masked keys, whose -inf would otherwise turn e^(s-m) (s-m) into 0 * inf.
constexpr float kExpFloor = -100.f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename scalar_t>
inline float to_float(scalar_t v) {
  return static_cast<float>(v);
}

template <typename scalar_t>
void pack_keys(const AttentionStatsProblem& p, const AttentionStatsWorkspace& ws, int64_t begin,
               int64_t end) {
  const int64_t D = p.head_dim;
  for (int64_t w = begin; w < end; ++w) {
    const int64_t kb = w % ws.key_blocks, bh = w / ws.key_blocks;
    const int64_t b = bh / p.kv_heads, hk = bh % p.kv_heads;
    const scalar_t* src = static_cast<const scalar_t*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
    float* dst = ws.keys + w * D * kAttnKeyBlock;
    for (int64_t c = 0; c < kAttnKeyBlock; ++c) {
      const int64_t j = kb * kAttnKeyBlock + c;
      if (j < p.k_len) {
        const scalar_t* row = src + j * p.k_stride_t;
        for (int64_t d = 0; d < D; ++d) dst[d * kAttnKeyBlock + c] = to_float(row[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d * kAttnKeyBlock + c] = 0.f;
      }
    }
  }
}

// scores[r][c] = sum_d q[r][d] * keys[d][c] for kTileRows query rows and one packed key block.
inline void score_tile(const float* q, int64_t D, const float* keys, float* scores) {
  for (int64_t c = 0; c < kAttnKeyBlock; c += 2 * kLanes) {
    FVec acc0[kTileRows], acc1[kTileRows];
    for (int r = 0; r < kTileRows; ++r) acc0[r] = acc1[r] = FVec(0.f);
    const float* kc = keys + c;
    for (int64_t d = 0; d < D; ++d, kc += kAttnKeyBlock) {
      const FVec k0 = FVec::loadu(kc), k1 = FVec::loadu(kc + kLanes);
#pragma GCC unroll 16
      for (int r = 0; r < kTileRows; ++r) {
        const FVec qr(q[r * D + d]);
        acc0[r] = at::vec::fmadd(qr, k0, acc0[r]);
        acc1[r] = at::vec::fmadd(qr, k1, acc1[r]);
      }
    }
    for (int r = 0; r < kTileRows; ++r) {
      acc0[r].store(scores + r * kAttnKeyBlock + c);
      acc1[r].store(scores + r * kAttnKeyBlock + c + kLanes);
    }
  }
}

struct RowState {
  FVec l, t, u;  // lane-wise partial sums relative to m
  float m;
  float sink;
  float s_self, s_prev;  // raw (masked) scores at j = i' and j = i' - 1; -inf until seen
  int64_t argmax;

  void reset() {
    l = t = u = FVec(0.f);
    m = kNegInf;
    sink = 0.f;
    s_self = s_prev = kNegInf;
    argmax = -1;
  }
};

// What masks one row: the row's own key range and the optional per-key/per-element masks.
struct RowMasks {
  int64_t lo, hi;          // keys [lo, hi) pass causal/window/length
  const float* key_bias;   // additive key padding for this batch row, or null
  AttentionMaskKind mask_kind;
  const void* mask_row;    // mask[b, h, i, :], or null
  int64_t mask_stride_k;
};

inline void update_row(RowState& st, float* s, int64_t j0, int64_t pos, const RowMasks& rm,
                       const AttentionStatsProblem& p) {
  constexpr int64_t B = kAttnKeyBlock;
  if (rm.hi <= j0 || rm.lo >= j0 + B) return;
  if (p.softcap > 0.f) {
    const FVec cap(p.softcap), inv_cap(1.f / p.softcap);
    for (int64_t c = 0; c < B; c += kLanes) (cap * (FVec::loadu(s + c) * inv_cap).tanh()).store(s + c);
  }
  if (rm.key_bias != nullptr) {
    for (int64_t c = 0; c < B; c += kLanes)
      (FVec::loadu(s + c) + FVec::loadu(rm.key_bias + j0 + c)).store(s + c);
  }
  const int64_t c_lo = std::max<int64_t>(rm.lo - j0, 0), c_hi = std::min<int64_t>(rm.hi - j0, B);
  if (rm.mask_kind == AttentionMaskKind::Bool) {  // the slow path: one element at a time
    const bool* mrow = static_cast<const bool*>(rm.mask_row);
    for (int64_t c = c_lo; c < c_hi; ++c)
      if (!mrow[(j0 + c) * rm.mask_stride_k]) s[c] = kNegInf;
  } else if (rm.mask_kind == AttentionMaskKind::Additive) {
    const float* mrow = static_cast<const float*>(rm.mask_row);
    for (int64_t c = c_lo; c < c_hi; ++c) s[c] += mrow[(j0 + c) * rm.mask_stride_k];
  }
  // Causal diagonal, window edge, keys past k_len: only on the blocks that cross them.
  for (int64_t c = 0; c < c_lo; ++c) s[c] = kNegInf;
  for (int64_t c = c_hi; c < B; ++c) s[c] = kNegInf;

  FVec vmax = FVec::loadu(s);
  for (int64_t c = kLanes; c < B; c += kLanes) vmax = at::vec::clamp_min(FVec::loadu(s + c), vmax);
  const float bmax = at::vec::vec_reduce_all<float>(
      [](const FVec& a, const FVec& b) { return at::vec::clamp_min(a, b); }, vmax);
  if (!(bmax > kNegInf)) return;  // every key of the block masked for this row
  if (bmax > st.m) {
    if (st.m > kNegInf) {
      const float delta = st.m - bmax;
      const FVec a(std::exp(delta));
      st.t = a * at::vec::fmadd(FVec(delta), st.l, st.t);
      st.l = st.l * a;
      st.u = st.u * a;
      st.sink *= std::exp(delta);
    }
    st.m = bmax;
    st.argmax = j0 + (std::find(s, s + B, bmax) - s);  // first index at ties
  }
  const FVec mv(st.m), floor(kExpFloor), step(static_cast<float>(kLanes));
  FVec dist = FVec(static_cast<float>(pos - j0)) - FVec::arange(0.f, 1.f);
  for (int64_t c = 0; c < B; c += kLanes) {
    const FVec d = at::vec::clamp_min(FVec::loadu(s + c) - mv, floor);
    const FVec e = d.exp_u20();
    st.l = st.l + e;
    st.t = at::vec::fmadd(e, d, st.t);
    st.u = at::vec::fmadd(e, dist, st.u);
    dist = dist - step;
  }
  if (j0 < p.sink_tokens) {
    const int64_t n = std::min<int64_t>(B, p.sink_tokens - j0);
    for (int64_t c = 0; c < n; ++c) st.sink += std::exp(s[c] - st.m);
  }
  if (pos >= j0 && pos < j0 + B) st.s_self = s[pos - j0];
  if (pos - 1 >= j0 && pos - 1 < j0 + B) st.s_prev = s[pos - 1 - j0];
}

inline void finish_row(const RowState& st, float* out) {
  if (!(st.m > kNegInf)) {  // no visible key: the statistics do not exist
    std::fill(out, out + kNumAttentionStats, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const auto sum = [](const FVec& v) {
    float lanes[kLanes];
    v.store(lanes);
    double s = 0;
    for (int i = 0; i < kLanes; ++i) s += lanes[i];
    return s;
  };
  const double l = sum(st.l), t = sum(st.t), u = sum(st.u), log_l = std::log(l);
  out[kStatEntropy] = static_cast<float>(log_l - t / l);
  out[kStatMaxWeight] = static_cast<float>(1.0 / l);
  out[kStatArgmax] = static_cast<float>(st.argmax);
  out[kStatSinkMass] = static_cast<float>(st.sink / l);
  out[kStatMeanDistance] = static_cast<float>(u / l);
  out[kStatSelfWeight] = static_cast<float>(std::exp(double(st.s_self) - st.m) / l);
  out[kStatPrevWeight] = static_cast<float>(std::exp(double(st.s_prev) - st.m) / l);
  out[kStatLse] = static_cast<float>(st.m + log_l);
}

// q_local: kAttnItemRows * head_dim floats of the caller's (no std containers in a TU compiled
// for another instruction set: GCC refuses to inline their always_inline members there).
template <typename scalar_t>
void stats_items(const AttentionStatsProblem& p, const AttentionStatsWorkspace& ws, float* q_local,
                 int64_t begin, int64_t end) {
  const int64_t D = p.head_dim, off = p.query_offset();
  const int64_t row_blocks = (p.q_len + kAttnItemRows - 1) / kAttnItemRows;
  alignas(64) float scores[kTileRows * kAttnKeyBlock];
  RowState rows[kAttnItemRows];

  for (int64_t w = begin; w < end; ++w) {
    // Under a causal mask late query blocks cost more than early ones; pairing them (0, last,
    // 1, last - 1, ...) gives each thread's contiguous share of items a balanced load.
    const int64_t bh = w / row_blocks, k = w % row_blocks;
    const int64_t qb = k % 2 == 0 ? k / 2 : row_blocks - 1 - k / 2;
    const int64_t b = bh / p.heads, h = bh % p.heads, hk = h / p.group_size();
    const int64_t i0 = qb * kAttnItemRows, n = std::min(kAttnItemRows, p.q_len - i0);

    const scalar_t* qsrc = static_cast<const scalar_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
    for (int64_t r = 0; r < kAttnItemRows; ++r) {
      float* dst = q_local + r * D;
      if (r < n) {
        const scalar_t* row = qsrc + (i0 + r) * p.q_stride_t;
        for (int64_t d = 0; d < D; ++d) dst[d] = to_float(row[d]) * p.scaling;
      } else {
        std::fill(dst, dst + D, 0.f);
      }
      rows[r].reset();
    }

    // Rows' ranges move right with the row, so the item needs [first row's lo, last row's hi).
    int64_t lo, hi, unused;
    p.key_range(i0 + off, lo, unused);
    p.key_range(i0 + n - 1 + off, unused, hi);
    const float* key_bias =
        ws.key_bias != nullptr ? ws.key_bias + b * ws.key_bias_stride_b : nullptr;
    const char* mask_bh = nullptr;
    const int64_t mask_elem = p.mask_kind == AttentionMaskKind::Bool ? sizeof(bool) : sizeof(float);
    if (p.mask_kind != AttentionMaskKind::None)
      mask_bh = static_cast<const char*>(p.mask) +
                (b * p.mask_stride_b + h * p.mask_stride_h) * mask_elem;

    for (int64_t kb = std::max<int64_t>(lo, 0) / kAttnKeyBlock; kb * kAttnKeyBlock < hi; ++kb) {
      const int64_t j0 = kb * kAttnKeyBlock;
      const float* keys = ws.keys + ((b * p.kv_heads + hk) * ws.key_blocks + kb) * D * kAttnKeyBlock;
      for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
        const int64_t rn = std::min<int64_t>(kTileRows, n - r0);
        int64_t tile_lo, tile_hi;
        p.key_range(i0 + r0 + off, tile_lo, unused);
        p.key_range(i0 + r0 + rn - 1 + off, unused, tile_hi);
        if (tile_hi <= j0 || tile_lo >= j0 + kAttnKeyBlock) continue;  // no row sees this block
        score_tile(q_local + r0 * D, D, keys, scores);
        for (int64_t r = 0; r < rn; ++r) {
          const int64_t i = i0 + r0 + r, pos = i + off;
          RowMasks rm{0, 0, key_bias, p.mask_kind, nullptr, p.mask_stride_k};
          p.key_range(pos, rm.lo, rm.hi);
          if (mask_bh != nullptr) rm.mask_row = mask_bh + i * p.mask_stride_q * mask_elem;
          update_row(rows[r0 + r], scores + r * kAttnKeyBlock, j0, pos, rm, p);
        }
      }
    }
    for (int64_t r = 0; r < n; ++r)
      finish_row(rows[r], p.out + ((b * p.heads + h) * p.q_len + i0 + r) * kNumAttentionStats);
  }
}

template <template <typename> class Fn, typename... Args>
void dispatch_dtype(StatsDtype dtype, Args... args) {
  switch (dtype) {
    case StatsDtype::Float32: return Fn<float>::run(args...);
    case StatsDtype::Float64: return Fn<double>::run(args...);
    case StatsDtype::Float16: return Fn<c10::Half>::run(args...);
    case StatsDtype::BFloat16: return Fn<c10::BFloat16>::run(args...);
  }
}

template <typename scalar_t>
struct PackKeys {
  static void run(const AttentionStatsProblem* p, const AttentionStatsWorkspace* ws, int64_t b,
                  int64_t e) {
    pack_keys<scalar_t>(*p, *ws, b, e);
  }
};

template <typename scalar_t>
struct StatsItems {
  static void run(const AttentionStatsProblem* p, const AttentionStatsWorkspace* ws, float* q_local,
                  int64_t b, int64_t e) {
    stats_items<scalar_t>(*p, *ws, q_local, b, e);
  }
};

inline void attention_pack_keys(const AttentionStatsProblem& p, const AttentionStatsWorkspace& ws,
                                int64_t begin, int64_t end) {
  dispatch_dtype<PackKeys>(p.dtype, &p, &ws, begin, end);
}

inline void attention_stats_items(const AttentionStatsProblem& p,
                                  const AttentionStatsWorkspace& ws, float* q_local, int64_t begin,
                                  int64_t end) {
  dispatch_dtype<StatsItems>(p.dtype, &p, &ws, q_local, begin, end);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace recon_fast
