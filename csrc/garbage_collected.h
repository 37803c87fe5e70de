// pybind11 classes whose C++ object holds Python objects that can refer back to it (a Recorder's
// fallback holds its session, which holds the Recorder): registered with tp_traverse and tp_clear,
// which call T::traverse(visit, arg) and T::clear(), so the cycle collector can free such cycles.
#pragma once

#include <pybind11/pybind11.h>

namespace recon_fast::direct {

template <typename T>
pybind11::custom_type_setup garbage_collected() {
  namespace py = pybind11;
  return py::custom_type_setup([](PyHeapTypeObject* heap_type) {
    PyTypeObject* type = &heap_type->ht_type;
    type->tp_flags |= Py_TPFLAGS_HAVE_GC;
    type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) {
      Py_VISIT(Py_TYPE(self));
      if (!py::detail::is_holder_constructed(self)) return 0;
      return py::cast<const T&>(py::handle(self)).traverse(visit, arg);
    };
    type->tp_clear = [](PyObject* self) {
      if (py::detail::is_holder_constructed(self)) py::cast<T&>(py::handle(self)).clear();
      return 0;
    };
  });
}

}  // namespace recon_fast::direct
