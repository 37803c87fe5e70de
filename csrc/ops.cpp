// The one place that declares recon_fast's ops (TORCH_LIBRARY), and the Python module whose
// import loads this library so the registrations run. Backends add implementations in cpu/ and
// cuda/ with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

#include "token_stats_rows.h"

extern "C" {
// `import recon_fast._C` loads the shared object; the ops are reached through torch.ops.recon_fast.
// The module's one function is the tracer's hook path (token_stats_rows), plain C API: no
// pybind11 module, so importing stays independent of pybind11's version.
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"token_stats_rows", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&recon_fast::token_stats_rows)),
       METH_FASTCALL, "token_stats_rows(x, buffer, row0): token_stats of x into buffer[row0 : row0 + rows]"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(recon_fast, m) {
  // Reduces the last dim of x to [energy, mean, std, min, max] per row, written into out
  // (float32, shape x.shape[:-1] + [5], any strides, e.g. a slice of a tracer's buffer).
  m.def("token_stats(Tensor x, Tensor(a!) out) -> ()");
  // Per query of q [batch, heads, q_len, head_dim] against k [batch, kv_heads, k_len, head_dim]
  // (GQA: heads a multiple of kv_heads), the softmax(q k^T * scaling) row summarised as float32
  // [batch, heads, q_len, 8] (entropy, max_weight, argmax, sink_mass, mean_distance, self_weight,
  // prev_weight, lse) in one online pass over key blocks; the [q_len, k_len] weights never exist.
  m.def(
      "attention_stats(Tensor q, Tensor k, float scaling, bool causal, int? window, float? softcap, "
      "Tensor? key_padding_mask, Tensor? mask, int sink_tokens) -> Tensor");
}
