// Checks and plans of recon_fast::token_stats_rows(x, buffer, row0) and
// recon_fast::token_stats_rows_grouped(xs, buffer, row0s): token_stats of activations into rows
// of a float32 [N, 5] arena chunk. The tracer's hooks call them so that the slice and view of
// the chunk are never made: on the H100 machine a hook's Python slice + view + torch.ops call
// cost ~20 us of host time, which a launch-bound forward (short sequences on a GPU) notices.
// The row pointers are worked out here from buffer's data pointer, without a tensor per slice.
#include "token_stats_rows.h"

#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>

#include "check_text.h"

namespace recon_fast {
namespace {

constexpr const char* kRowsOp = "token_stats_rows";
constexpr const char* kGroupedOp = "token_stats_rows_grouped";

// The tensor an error is about: "x" for token_stats_rows (index < 0), "xs[2]" in a group. Only
// called once a check has failed (TORCH_CHECK evaluates its message then).
std::string subject(int64_t index) { return index < 0 ? std::string("x") : "xs[" + num(index) + "]"; }

// " of xs[2]" in a group, nothing for token_stats_rows' one tensor.
std::string of_subject(int64_t index) { return index < 0 ? std::string() : " of " + subject(index); }

// row0 + rows, saturated: a row0 near INT64_MAX must not overflow while its error is worded.
int64_t end_row(int64_t row0, int64_t rows) {
  return row0 > std::numeric_limits<int64_t>::max() - rows ? std::numeric_limits<int64_t>::max() : row0 + rows;
}

void check_buffer(const char* op, const at::Tensor& buffer) {
  TORCH_CHECK(buffer.defined(), op, ": buffer is undefined");
  TORCH_CHECK(buffer.dim() == 2 && buffer.size(1) == kNumStats && buffer.is_contiguous(), op,
              ": buffer must be a contiguous [N, ", num(kNumStats), "] tensor");
  TORCH_CHECK(buffer.scalar_type() == at::kFloat, op, ": buffer must be float32, got ", buffer.scalar_type());
}

// Checks one tensor of the op against the buffer; returns its element type.
StatsDtype check_x(const char* op, int64_t index, const at::Tensor& x, const at::Tensor& buffer) {
  TORCH_CHECK(x.defined(), op, ": ", subject(index), " is undefined");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": ", subject(index), " needs a non-empty last dimension");
  TORCH_CHECK(!x.is_complex(), op, ": complex ", subject(index), " is not supported, got ", x.scalar_type());
  TORCH_CHECK(x.is_floating_point(), op, ": ", subject(index),
              " must be a floating tensor (float32, float64, float16, bfloat16), got ", x.scalar_type());
  const std::optional<StatsDtype> dtype = stats_dtype(x.scalar_type());
  TORCH_CHECK(dtype.has_value(), op, ": ", subject(index), " must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());  // the float8 types
  TORCH_CHECK(x.device() == buffer.device(), op, ": ", subject(index), " is on ", x.device().str(),
              " but buffer is on ", buffer.device().str());
  return *dtype;
}

// Rows [row0, row0 + rows) must lie inside the buffer's N rows.
void check_rows(const char* op, int64_t index, int64_t row0, int64_t rows, int64_t buffer_rows) {
  TORCH_CHECK(row0 >= 0 && row0 <= buffer_rows && rows <= buffer_rows - row0, op, ": rows [", num(row0), ", ",
              num(end_row(row0, rows)), ")", of_subject(index), " are outside the buffer's ", num(buffer_rows));
}

// x's rows into the buffer from row0 on, as a problem: x itself, or its contiguous copy in
// `storage` when its last dim is strided (the documented slow path of token_stats).
TokenStatsProblem describe(const char* op, int64_t index, const at::Tensor& x_in, StatsDtype dtype,
                           const at::Tensor& buffer, int64_t row0, at::Tensor& storage) {
  const bool strided = x_in.stride(-1) != 1 && x_in.size(-1) != 1;
  if (strided) storage = x_in.contiguous();
  const at::Tensor& x = strided ? storage : x_in;
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  // The out rows are contiguous: strides of a [*lead, 5] tensor.
  c10::SmallVector<int64_t, kMaxRowDims> out_strides(lead.size());
  int64_t stride = kNumStats;
  for (size_t d = lead.size(); d-- > 0;) {
    out_strides[d] = stride;
    stride *= lead[d];
  }
  TokenStatsProblem p;
  p.x = x.data_ptr();
  p.dtype = dtype;
  p.dim = x.size(-1);
  p.rows = x.numel() / p.dim;
  p.out = static_cast<float*>(buffer.data_ptr()) + row0 * kNumStats;
  p.out_stat_stride = 1;
  const int row_dims = build_row_indexers(lead, x.strides().slice(0, x.dim() - 1), out_strides, p.x_rows, p.out_rows);
  TORCH_CHECK(row_dims <= kMaxRowDims, op, ": ", subject(index), " has too many non-mergeable leading dimensions (",
              num(row_dims), " > ", num(kMaxRowDims), "); call .contiguous() first");
  return p;
}

}  // namespace

TokenStatsPlan plan_token_stats_rows(const at::Tensor& x, const at::Tensor& buffer, int64_t row0) {
  check_buffer(kRowsOp, buffer);
  const StatsDtype dtype = check_x(kRowsOp, -1, x, buffer);
  const int64_t rows = x.numel() / x.size(-1);
  check_rows(kRowsOp, -1, row0, rows, buffer.size(0));
  TokenStatsPlan plan;
  plan.problem = describe(kRowsOp, -1, x, dtype, buffer, row0, plan.x_storage);
  return plan;
}

TokenStatsGroupPlan plan_token_stats_rows_grouped(at::TensorList xs, const at::Tensor& buffer,
                                                  at::IntArrayRef row0s) {
  TORCH_CHECK(xs.size() == row0s.size(), kGroupedOp, ": xs has ", num(xs.size()), " tensors but row0s has ",
              num(row0s.size()), " rows");
  check_buffer(kGroupedOp, buffer);
  const int64_t buffer_rows = buffer.size(0);
  TokenStatsGroupPlan plan;
  plan.problems.reserve(xs.size());
  // (first row, end row, index) of the tensors that have rows, for the overlap check.
  struct Span {
    int64_t row0, end, index;
  };
  c10::SmallVector<Span, 32> spans;
  bool ordered = true;
  for (size_t i = 0; i < xs.size(); ++i) {
    const int64_t index = static_cast<int64_t>(i);
    const at::Tensor& x = xs[i];
    const StatsDtype dtype = check_x(kGroupedOp, index, x, buffer);
    const int64_t rows = x.numel() / x.size(-1);
    check_rows(kGroupedOp, index, row0s[i], rows, buffer_rows);
    if (rows == 0) continue;
    at::Tensor storage;
    plan.problems.push_back(describe(kGroupedOp, index, x, dtype, buffer, row0s[i], storage));
    if (storage.defined()) plan.storage.push_back(std::move(storage));
    plan.rows += rows;
    plan.elements += rows * x.size(-1);
    ordered = ordered && (spans.empty() || spans.back().row0 <= row0s[i]);
    spans.push_back({row0s[i], row0s[i] + rows, index});
  }
  // The tracer's groups come in row order; any other is sorted first.
  if (!ordered) {
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.row0 < b.row0; });
  }
  for (size_t k = 1; k < spans.size(); ++k) {
    const Span& a = spans[k - 1];
    const Span& b = spans[k];
    TORCH_CHECK(b.row0 >= a.end, kGroupedOp, ": rows [", num(b.row0), ", ", num(b.end), ")", of_subject(b.index),
                " overlap rows [", num(a.row0), ", ", num(a.end), ")", of_subject(a.index));
  }
  return plan;
}

}  // namespace recon_fast
