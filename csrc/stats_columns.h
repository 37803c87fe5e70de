// recon_fast._C.copy_stat_columns: the cube's read of the stats arena after a traced pass
// (recon_fast/trace/stats_capture.py: TokenStatsCapture.data) in one call. Right after the forward
// of a host-bound model every library the read touches is cold: the same copy through torch and
// numpy (a slice, a view, isfinite, all, a column gather) cost the proxy ~100 us a run (issue 17).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace recon_fast::direct {

namespace py = pybind11;

// Copies the `columns` of every row of `rows` (a contiguous float32 CPU [n, kNumStats] tensor, the
// arena's rows on the host) into `out` (a writable C-contiguous float32 buffer of n * columns
// elements, e.g. a numpy array [layers, batch, tokens, columns]), row after row. Returns whether
// every row's energy (column 0, which is NaN or Inf exactly when the row holds one or overflows)
// is finite, so that the caller looks for the first non-finite one only when there is one.
bool copy_stat_columns(const at::Tensor& rows, py::buffer out, const std::vector<int64_t>& columns);

}  // namespace recon_fast::direct
