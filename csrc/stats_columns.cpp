// recon_fast._C.copy_stat_columns (see stats_columns.h).
#include "stats_columns.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstring>
#include <string>

#include "check_text.h"
#include "token_stats_problem.h"

namespace recon_fast::direct {

bool copy_stat_columns(const at::Tensor& rows, py::buffer out, const std::vector<int64_t>& columns) {
  TORCH_CHECK(rows.defined() && rows.is_cpu() && rows.scalar_type() == at::kFloat && rows.dim() == 2 &&
                  rows.size(1) == kNumStats && rows.is_contiguous(),
              "copy_stat_columns: rows must be a contiguous float32 CPU [n, ", num(kNumStats), "] tensor");
  TORCH_CHECK(!columns.empty(), "copy_stat_columns: no columns");
  for (const int64_t c : columns) {
    TORCH_CHECK(c >= 0 && c < kNumStats, "copy_stat_columns: column ", num(c), " is not in [0, ", num(kNumStats), ")");
  }
  const py::buffer_info info = out.request(/*writable=*/true);
  TORCH_CHECK(info.format == py::format_descriptor<float>::format() && info.itemsize == sizeof(float),
              "copy_stat_columns: out must hold float32, got format '", info.format, "'");
  // C-contiguous: each stride is the product of the sizes after it.
  py::ssize_t expected = info.itemsize;
  for (py::ssize_t d = info.ndim; d-- > 0;) {
    TORCH_CHECK(info.shape[d] == 1 || info.strides[d] == expected, "copy_stat_columns: out must be C-contiguous");
    expected *= info.shape[d];
  }
  const int64_t n = rows.size(0);
  const auto width = static_cast<int64_t>(columns.size());
  TORCH_CHECK(info.size == n * width, "copy_stat_columns: out holds ", num(info.size), " values, not ",
              num(n * width), " (", num(n), " rows of ", num(width), " columns)");
  const float* src = rows.const_data_ptr<float>();
  auto* dst = static_cast<float*>(info.ptr);
  bool finite = true;
  if (width == kNumStats && columns == std::vector<int64_t>{0, 1, 2, 3, 4}) {
    std::memcpy(dst, src, sizeof(float) * n * kNumStats);
    for (int64_t r = 0; r < n; ++r) finite = finite && std::isfinite(src[r * kNumStats]);
    return finite;
  }
  for (int64_t r = 0; r < n; ++r, src += kNumStats, dst += width) {
    finite = finite && std::isfinite(src[0]);
    for (int64_t k = 0; k < width; ++k) dst[k] = src[columns[k]];
  }
  return finite;
}

}  // namespace recon_fast::direct
