// The one place that declares recon_fast's ops (TORCH_LIBRARY), and the Python module whose
// import loads this library so the registrations run. Backends add implementations in cpu/ and
// cuda/ with TORCH_LIBRARY_IMPL. The module also carries the eager hot path's direct launchers
// (token_stats_direct.cpp), which reach the same kernels without the dispatcher, the hooks'
// Recorder (token_stats_recorder.cpp), which calls them for a whole traced pass, the wrapper of a
// module's forward that calls the Recorder (traced_forward.cpp), the cube's read of the arena
// (stats_columns.cpp), and the names of the ops' output
// channels.
#include <torch/extension.h>
#include <torch/library.h>

#include "attention_stats_problem.h"
#include "stats_columns.h"
#include "token_stats_direct.h"
#include "token_stats_problem.h"
#include "token_stats_recorder.h"
#include "traced_forward.h"

namespace {

template <size_t N>
pybind11::tuple names_of(const char* const (&names)[N]) {
  pybind11::tuple out(N);
  for (size_t i = 0; i < N; ++i) out[i] = pybind11::str(names[i]);
  return out;
}

}  // namespace

TORCH_LIBRARY(recon_fast, m) {
  // Reduces the last dim of x to its kNumStats statistics per row (kTokenStatNames: energy, mean,
  // std, min, max), written into out (float32, shape x.shape[:-1] + [kNumStats], any strides,
  // e.g. a slice of a tracer's buffer).
  m.def("token_stats(Tensor x, Tensor(a!) out) -> ()");
  // token_stats of x into rows [row0, row0 + rows) of a contiguous float32 [N, kNumStats] buffer:
  // the tracer's hook path, which would otherwise slice and view the buffer in Python per call.
  m.def("token_stats_rows(Tensor x, Tensor(a!) buffer, SymInt row0) -> ()");
  // token_stats_rows of every xs[i] at row0s[i] in one launch (one at::parallel_for on the CPU,
  // one kernel per kind of row on CUDA): the tracer's grouped path, a decoder layer's outputs at
  // a time. The tensors' rows must not overlap; xs may mix dtypes and be empty.
  m.def("token_stats_rows_grouped(Tensor[] xs, Tensor(a!) buffer, SymInt[] row0s) -> ()");
  // Per query of q [batch, heads, q_len, head_dim] against k [batch, kv_heads, k_len, head_dim]
  // (GQA: heads a multiple of kv_heads), the softmax(q k^T * scaling) row summarised as float32
  // [batch, heads, q_len, kNumAttentionStats] (kAttentionStatNames: entropy, max_weight, argmax,
  // ...) in one online pass over key blocks; the [q_len, k_len] weights never exist.
  m.def(
      "attention_stats(Tensor q, Tensor k, float scaling, bool causal, int? window, float? softcap, "
      "Tensor? key_padding_mask, Tensor? mask, int sink_tokens) -> Tensor");
  // Which CPU kernel of token_stats would run now: "avx2" or "default" (cpu/token_stats_cpu.cpp),
  // for tests and recon_fast.kernels.token_stats.cpu_kernel. No tensor to dispatch on: its one
  // kernel is CompositeImplicitAutograd, which serves the empty key set.
  m.def("cpu_kernel() -> str");
}

// `import recon_fast._C` loads the library (registering the ops above) and gives the direct
// launchers and the hooks' Recorder. TORCH_EXTENSION_NAME is _C when built by setup.py,
// recon_fast_C when JIT-built.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using recon_fast::direct::token_stats_rows_grouped_into;
  using recon_fast::direct::token_stats_rows_into;
  // The GIL is let go while a kernel runs, as torch.ops calls do.
  m.def("token_stats_rows_into", &token_stats_rows_into, py::arg("x"), py::arg("buffer"), py::arg("row0"),
        py::call_guard<py::gil_scoped_release>(),
        "token_stats_rows(x, buffer, row0) without the dispatcher: x [..., D] into rows [row0, row0 + rows)\n"
        "of the contiguous float32 [N, 5] buffer; the op's checks and error messages.");
  m.def("token_stats_rows_grouped_into", &token_stats_rows_grouped_into, py::arg("xs"), py::arg("buffer"),
        py::arg("row0s"), py::call_guard<py::gil_scoped_release>(),
        "token_stats_rows_grouped(xs, buffer, row0s) without the dispatcher: every xs[i] into its rows\n"
        "from row0s[i] on, in one launch; the op's checks and error messages.");
  m.attr("with_cuda") = recon_fast::direct::with_cuda();
  m.def(
      "channel_names",
      [] {
        pybind11::dict names;
        names["token_stats"] = names_of(recon_fast::kTokenStatNames);
        names["attention_stats"] = names_of(recon_fast::kAttentionStatNames);
        return names;
      },
      "{op: the names of its output channels in index order} for token_stats and attention_stats:\n"
      "csrc's kTokenStatNames and kAttentionStatNames, which recon_fast/kernels/stats_tables.py must list.");
  m.def("copy_stat_columns", &recon_fast::direct::copy_stat_columns, py::arg("rows"), py::arg("out"),
        py::arg("columns"),
        "The columns of the arena's host rows (float32 [n, 5]) into out (C-contiguous float32, n * len(columns)\n"
        "values); whether every row's energy is finite.");
  // The hooks' eager path for one traced pass (token_stats_recorder.h).
  recon_fast::direct::bind_recorder(m);
  // The hooks' wrapper of a module's forward, which keeps nn.Module's fast path (traced_forward.h).
  recon_fast::direct::bind_traced_forward(m);
}
