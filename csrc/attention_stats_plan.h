// Validation of attention_stats arguments and their translation into an AttentionStatsProblem.
// Shared by the CPU and CUDA registrations so that both reject bad input with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "attention_stats_problem.h"

namespace recon_fast {

struct AttentionStatsPlan {
  at::Tensor out;  // float32 [batch, heads, q_len, 8], contiguous
  // Copies made only on the slow paths: q/k whose last dim is strided, an additive mask that is
  // not float32. Empty otherwise; they keep the problem's pointers alive.
  at::Tensor q_storage, k_storage, mask_storage;
  AttentionStatsProblem problem;
};

// Checks every argument with errors that name what failed, allocates the output and describes
// the work. Never copies q or k unless their last dimension is strided.
AttentionStatsPlan plan_attention_stats(const at::Tensor& q, const at::Tensor& k, double scaling,
                                        bool causal, std::optional<int64_t> window,
                                        std::optional<double> softcap,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        const std::optional<at::Tensor>& mask, int64_t sink_tokens);

}  // namespace recon_fast
