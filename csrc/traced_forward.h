// recon_fast._C.TracedForward and ForwardSink: a Tracer's hook on a module without nn.Module's
// hook path. Any forward hook sends every call of its module down _call_impl's slow path (the
// hook dicts, the global hooks, the backward-hook checks): on the host-bound proxy (365 hooks,
// T=8) that costs 1.07-1.09x the hook-free forward before a hook does anything. A TracedForward
// is instead the module's `forward` instance attribute (so _call_impl keeps its fast path): a C
// callable (vectorcall) that calls the class's forward (looked up at each call, as self.forward
// would be) or the forward attribute it replaced, and hands the output to the run's recorder,
// which its ForwardSink holds: the C++ Recorder, called directly, any other record(name, output)
// callable, or nothing outside a run. recon_fast/trace/module_hooks.py
// decides which modules take it and puts the forward hook back where it would not see what a
// hook sees.
#pragma once

#include <torch/extension.h>

namespace recon_fast::direct {

namespace py = pybind11;

class Recorder;

// What the TracedForwards of one Tracer record into, for the Tracer's life.
class __attribute__((visibility("hidden"))) ForwardSink {
 public:
  // The run's recorder: None (outside a run: the wrappers only call through), a Recorder (called
  // in C++), or any callable record(name, output).
  py::object record() const { return record_; }
  void set_record(py::object record);

  // Hands `output` of the module called `name` to the recorder, if any; throws what it throws.
  void deliver(PyObject* name, PyObject* output) const;
  bool armed() const { return native_ != nullptr || !record_.is_none(); }

  int traverse(visitproc visit, void* arg) const {
    Py_VISIT(record_.ptr());
    return 0;
  }
  void clear() {
    record_ = py::none();
    native_ = nullptr;
  }

 private:
  py::object record_ = py::none();
  Recorder* native_ = nullptr;  // record_'s Recorder, when it is one (record_ keeps it alive)
};

// Registers recon_fast._C.ForwardSink, recon_fast._C.TracedForward and
// recon_fast._C.displaced_forwards (called from the module init in ops.cpp).
void bind_traced_forward(py::module_& m);

}  // namespace recon_fast::direct
