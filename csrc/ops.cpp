// The one place that declares recon_fast's ops (TORCH_LIBRARY), and the Python module whose
// import loads this library so the registrations run. Backends add implementations in cpu/ and
// cuda/ with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import recon_fast._C` only needs to load the shared object; the ops are reached through
// torch.ops.recon_fast. An empty module keeps this independent of pybind11 and the Python ABI.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(recon_fast, m) {
  // Reduces the last dim of x to [energy, mean, std, min, max] per row, written into out
  // (float32, shape x.shape[:-1] + [5], any strides, e.g. a slice of a tracer's buffer).
  m.def("token_stats(Tensor x, Tensor(a!) out) -> ()");
  // token_stats of x into rows [row0, row0 + rows) of a contiguous float32 [N, 5] buffer: the
  // tracer's hook path, which would otherwise slice and view the buffer in Python per call.
  m.def("token_stats_rows(Tensor x, Tensor(a!) buffer, SymInt row0) -> ()");
  // Per query of q [batch, heads, q_len, head_dim] against k [batch, kv_heads, k_len, head_dim]
  // (GQA: heads a multiple of kv_heads), the softmax(q k^T * scaling) row summarised as float32
  // [batch, heads, q_len, 8] (entropy, max_weight, argmax, sink_mass, mean_distance, self_weight,
  // prev_weight, lse) in one online pass over key blocks; the [q_len, k_len] weights never exist.
  m.def(
      "attention_stats(Tensor q, Tensor k, float scaling, bool causal, int? window, float? softcap, "
      "Tensor? key_padding_mask, Tensor? mask, int sink_tokens) -> Tensor");
}
