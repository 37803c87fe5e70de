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
}
