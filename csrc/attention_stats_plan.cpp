// Argument checks and layout for attention_stats, written once for every backend.
#include "attention_stats_plan.h"

#include "check_text.h"
#include "token_stats_plan.h"  // stats_dtype_of

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace recon_fast {
namespace {

// The kernels read each head_dim row as a contiguous run; a strided last dim (rare: a view that
// transposed head_dim itself) is made contiguous once rather than complicating every tile load.
at::Tensor with_contiguous_rows(const at::Tensor& x) {
  return x.stride(-1) == 1 || x.size(-1) == 1 ? x : x.contiguous();
}

}  // namespace

AttentionStatsPlan plan_attention_stats(const at::Tensor& q_in, const at::Tensor& k_in,
                                        double scaling, bool causal, std::optional<int64_t> window,
                                        std::optional<double> softcap,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        const std::optional<at::Tensor>& mask, int64_t sink_tokens) {
  TORCH_CHECK(q_in.defined() && k_in.defined(), "attention_stats: q or k is undefined");
  TORCH_CHECK(q_in.dim() == 4, "attention_stats: q must be 4-D [batch, heads, q_len, head_dim], got shape ",
              shape_str(q_in.sizes()));
  TORCH_CHECK(k_in.dim() == 4,
              "attention_stats: k must be 4-D [batch, kv_heads, k_len, head_dim], got shape ",
              shape_str(k_in.sizes()));
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type(), "attention_stats: q is ", q_in.scalar_type(),
              " but k is ", k_in.scalar_type());
  const StatsDtype dtype = stats_dtype_of(q_in, "attention_stats: q and k");
  TORCH_CHECK(q_in.device() == k_in.device(), "attention_stats: q is on ", q_in.device().str(),
              " but k is on ", k_in.device().str());
  const int64_t batch = q_in.size(0), heads = q_in.size(1), q_len = q_in.size(2);
  const int64_t kv_heads = k_in.size(1), k_len = k_in.size(2), head_dim = q_in.size(3);
  TORCH_CHECK(k_in.size(0) == batch, "attention_stats: q has batch ", num(batch), " but k has batch ",
              num(k_in.size(0)));
  TORCH_CHECK(k_in.size(3) == head_dim, "attention_stats: q has head_dim ", num(head_dim),
              " but k has head_dim ", num(k_in.size(3)));
  TORCH_CHECK(head_dim > 0, "attention_stats: head_dim is empty (size 0)");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "attention_stats: q has ", num(heads),
              " heads, not a multiple of k's ", num(kv_heads));
  TORCH_CHECK(std::isfinite(scaling), "attention_stats: scaling must be finite, got ", num(scaling));
  TORCH_CHECK(!window.has_value() || *window >= 1,
              "attention_stats: window must be at least 1 (keys a query sees, itself included), got ",
              num(window.value_or(0)));
  TORCH_CHECK(!softcap.has_value() || (*softcap > 0 && std::isfinite(*softcap)),
              "attention_stats: softcap must be positive and finite, got ", num(softcap.value_or(0)));
  TORCH_CHECK(sink_tokens >= 0, "attention_stats: sink_tokens must be >= 0, got ", num(sink_tokens));

  AttentionStatsPlan plan;
  AttentionStatsProblem& p = plan.problem;

  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& kpm = *key_padding_mask;
    TORCH_CHECK(kpm.scalar_type() == at::kBool,
                "attention_stats: key_padding_mask must be bool (true = keep), got ", kpm.scalar_type());
    TORCH_CHECK(kpm.dim() == 2 && kpm.size(0) == batch && kpm.size(1) == k_len,
                "attention_stats: key_padding_mask must have shape [", num(batch), ", ", num(k_len),
                "] ([batch, k_len]), got ", shape_str(kpm.sizes()));
    TORCH_CHECK(kpm.device() == q_in.device(), "attention_stats: key_padding_mask is on ",
                kpm.device().str(), " but q is on ", q_in.device().str());
    p.key_padding = kpm.data_ptr<bool>();
    p.key_padding_stride_b = kpm.stride(0);
    p.key_padding_stride_t = kpm.stride(1);
  }

  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool || m.is_floating_point(),
                "attention_stats: mask must be bool (true = keep) or floating (added to the scores), got ",
                m.scalar_type());
    TORCH_CHECK(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == batch) &&
                    (m.size(1) == 1 || m.size(1) == heads) && m.size(2) == q_len &&
                    m.size(3) == k_len,
                "attention_stats: mask must have shape [", num(batch), " or 1, ", num(heads), " or 1, ",
                num(q_len), ", ", num(k_len), "], got ", shape_str(m.sizes()));
    TORCH_CHECK(m.device() == q_in.device(), "attention_stats: mask is on ", m.device().str(),
                " but q is on ", q_in.device().str());
    // Additive masks are read as float32 (the precision scores are kept in): other dtypes are
    // converted once, which costs a copy of the mask on this already slow path.
    const at::Tensor mm = m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat
                              ? m
                              : m.to(at::kFloat);
    if (!mm.is_same(m)) plan.mask_storage = mm;
    p.mask_kind = mm.scalar_type() == at::kBool ? AttentionMaskKind::Bool : AttentionMaskKind::Additive;
    p.mask = mm.data_ptr();
    // Broadcast dims read one row for all: stride 0.
    p.mask_stride_b = mm.size(0) == 1 ? 0 : mm.stride(0);
    p.mask_stride_h = mm.size(1) == 1 ? 0 : mm.stride(1);
    p.mask_stride_q = mm.stride(2);
    p.mask_stride_k = mm.stride(3);
  }

  const at::Tensor q = with_contiguous_rows(q_in);
  const at::Tensor k = with_contiguous_rows(k_in);
  if (!q.is_same(q_in)) plan.q_storage = q;
  if (!k.is_same(k_in)) plan.k_storage = k;

  plan.out = at::empty({batch, heads, q_len, kNumAttentionStats}, q.options().dtype(at::kFloat));

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.dtype = dtype;
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.q_len = q_len;
  p.k_len = k_len;
  p.head_dim = head_dim;
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.q_stride_t = q.stride(2);
  p.k_stride_b = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.k_stride_t = k.stride(2);
  p.scaling = static_cast<float>(scaling);
  p.causal = causal;
  p.window = window.value_or(0);
  p.softcap = static_cast<float>(softcap.value_or(0.0));
  p.sink_tokens = sink_tokens;
  p.out = plan.out.data_ptr<float>();
  return plan;
}

}  // namespace recon_fast
