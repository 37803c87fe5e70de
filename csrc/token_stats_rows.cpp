// The tracer's hook path into token_stats: x's statistics into rows [row0, row0 + rows) of a
// float32 [N, 5] arena chunk, called straight from Python (METH_FASTCALL). A hook that sliced
// and viewed the chunk in Python and went through torch.ops paid ~20 us of host time on an
// H100's host; the same steps here cost a few, which is what a launch-bound forward (short
// sequences on a GPU) notices. Any device: the op is reached through the dispatcher.
#include "token_stats_rows.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

#include "token_stats_problem.h"

namespace recon_fast {

PyObject* token_stats_rows(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 3, "token_stats_rows(x, buffer, row0) takes 3 arguments, got ", nargs);
  TORCH_CHECK(THPVariable_Check(args[0]) && THPVariable_Check(args[1]),
              "token_stats_rows: x and buffer must be tensors");
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Tensor& buffer = THPVariable_Unpack(args[1]);
  const int64_t row0 = PyLong_AsLongLong(args[2]);
  if (row0 == -1 && PyErr_Occurred()) return nullptr;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0,
              "token_stats_rows: x needs a non-empty last dimension");
  TORCH_CHECK(buffer.dim() == 2 && buffer.size(1) == kNumStats && buffer.is_contiguous(),
              "token_stats_rows: buffer must be a contiguous [N, ", kNumStats, "] tensor");
  const int64_t rows = x.numel() / x.size(-1);
  TORCH_CHECK(row0 >= 0 && row0 + rows <= buffer.size(0), "token_stats_rows: rows [", row0, ", ",
              row0 + rows, ") are outside the buffer's ", buffer.size(0));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = kNumStats;
  at::Tensor out = buffer.narrow(0, row0, rows).view(shape);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("recon_fast::token_stats", "")
                             .typed<void(const at::Tensor&, at::Tensor&)>();
  {
    // No autograd or version-counter work: statistics of an activation are not differentiated.
    const at::AutoDispatchBelowADInplaceOrView guard;
    op.call(x, out);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace recon_fast
