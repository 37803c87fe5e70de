// Argument checks and row layout for token_stats, written once for every backend.
#include "token_stats_plan.h"

#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>

#include "check_text.h"

namespace recon_fast {

// Merges adjacent leading dims that are contiguous with each other in *both* tensors, so the
// usual case (a contiguous x and a contiguous or sliced out) indexes rows with one multiply.
int build_row_indexers(at::IntArrayRef sizes, at::IntArrayRef x_strides, at::IntArrayRef out_strides,
                       RowIndexer& x_rows, RowIndexer& out_rows) {
  c10::SmallVector<int64_t, kMaxRowDims> sz, xs, os;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 1) continue;  // a size-1 dim contributes nothing to any offset
    if (!sz.empty() && xs.back() == x_strides[d] * sizes[d] &&
        os.back() == out_strides[d] * sizes[d]) {
      sz.back() *= sizes[d];
      xs.back() = x_strides[d];
      os.back() = out_strides[d];
      continue;
    }
    sz.push_back(sizes[d]);
    xs.push_back(x_strides[d]);
    os.push_back(out_strides[d]);
  }
  if (sz.empty()) {  // a single row
    sz.push_back(1);
    xs.push_back(0);
    os.push_back(0);
  }
  const int ndim = static_cast<int>(sz.size());
  if (ndim > kMaxRowDims) return ndim;
  x_rows.ndim = out_rows.ndim = ndim;
  for (int d = 0; d < ndim; ++d) {
    x_rows.sizes[d] = out_rows.sizes[d] = sz[d];
    x_rows.strides[d] = xs[d];
    out_rows.strides[d] = os[d];
  }
  return ndim;
}

std::optional<StatsDtype> stats_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return StatsDtype::Float32;
    case at::kDouble: return StatsDtype::Float64;
    case at::kHalf: return StatsDtype::Float16;
    case at::kBFloat16: return StatsDtype::BFloat16;
    default: return std::nullopt;
  }
}

StatsDtype stats_dtype_of(const at::Tensor& t, const char* what) {
  const std::optional<StatsDtype> dtype = stats_dtype(t.scalar_type());
  TORCH_CHECK(dtype.has_value(), what, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  return *dtype;
}

TokenStatsPlan plan_token_stats(const at::Tensor& x_in, const at::Tensor& out) {
  TORCH_CHECK(x_in.defined(), "token_stats: x is undefined");
  TORCH_CHECK(x_in.dim() >= 1, "token_stats: x must have at least one dimension (the one reduced)");
  TORCH_CHECK(!x_in.is_complex(), "token_stats: complex x is not supported, got ",
              x_in.scalar_type());
  TORCH_CHECK(x_in.is_floating_point(),
              "token_stats: x must be a floating tensor (float32, float64, float16, bfloat16), got ",
              x_in.scalar_type());
  const StatsDtype dtype = stats_dtype_of(x_in, "token_stats: x");
  TORCH_CHECK(x_in.size(-1) > 0, "token_stats: the last dimension of x is empty (size 0)");

  TORCH_CHECK(out.defined(), "token_stats: out is undefined");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "token_stats: out must be float32, got ",
              out.scalar_type());
  TORCH_CHECK(out.device() == x_in.device(), "token_stats: out is on ", out.device().str(),
              " but x is on ", x_in.device().str());
  const auto lead = x_in.sizes().slice(0, x_in.dim() - 1);
  TORCH_CHECK(out.dim() == x_in.dim() && out.sizes().slice(0, out.dim() - 1) == lead &&
                  out.size(-1) == kNumStats,
              "token_stats: out must have shape ", shape_str(lead), " + [", num(kNumStats),
              "] for x of shape ", shape_str(x_in.sizes()), ", got ", shape_str(out.sizes()));

  TokenStatsPlan plan;
  // The kernels read each row as a contiguous run; a strided last dim is made contiguous once
  // (the documented slow path) rather than complicating every kernel's inner loop.
  const at::Tensor x = x_in.stride(-1) == 1 || x_in.size(-1) == 1 ? x_in : x_in.contiguous();
  if (!x.is_same(x_in)) plan.x_storage = x;

  TokenStatsProblem& p = plan.problem;
  p.x = x.data_ptr();
  p.dtype = dtype;
  p.dim = x.size(-1);
  p.rows = x.numel() / p.dim;
  p.out = out.data_ptr<float>();
  p.out_stat_stride = out.stride(-1);
  const int row_dims = build_row_indexers(lead, x.strides().slice(0, x.dim() - 1),
                                          out.strides().slice(0, out.dim() - 1), p.x_rows, p.out_rows);
  TORCH_CHECK(row_dims <= kMaxRowDims,
              "token_stats: x has too many non-mergeable leading dimensions (", num(row_dims),
              " > ", num(kMaxRowDims), "); call .contiguous() first");
  return plan;
}

}  // namespace recon_fast
