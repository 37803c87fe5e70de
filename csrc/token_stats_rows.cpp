// recon_fast::token_stats_rows(x, buffer, row0): token_stats of x into rows
// [row0, row0 + rows) of a float32 [N, 5] arena chunk. The tracer's hooks call it so that the
// slice and view of the chunk are made here, not in Python: on the H100 machine a hook's Python
// slice + view + torch.ops call cost ~20 us of host time, which a launch-bound forward (short
// sequences on a GPU) notices. One device-generic kernel: token_stats itself picks the backend.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "check_text.h"
#include "token_stats_problem.h"

namespace recon_fast {
namespace {

void token_stats_rows(const at::Tensor& x, at::Tensor& buffer, int64_t row0) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0,
              "token_stats_rows: x needs a non-empty last dimension");
  TORCH_CHECK(buffer.dim() == 2 && buffer.size(1) == kNumStats && buffer.is_contiguous(),
              "token_stats_rows: buffer must be a contiguous [N, ", num(kNumStats), "] tensor");
  const int64_t rows = x.numel() / x.size(-1);
  TORCH_CHECK(row0 >= 0 && row0 + rows <= buffer.size(0), "token_stats_rows: rows [", num(row0), ", ",
              num(row0 + rows), ") are outside the buffer's ", num(buffer.size(0)));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = kNumStats;
  at::Tensor out = buffer.narrow(0, row0, rows).view(shape);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("recon_fast::token_stats", "")
                             .typed<void(const at::Tensor&, at::Tensor&)>();
  op.call(x, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(recon_fast, CompositeExplicitAutograd, m) {
  m.impl("token_stats_rows", &token_stats_rows);
}

}  // namespace recon_fast
