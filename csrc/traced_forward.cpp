// recon_fast._C.TracedForward and ForwardSink (see traced_forward.h). TracedForward is a plain
// CPython type rather than a pybind11 class: it is called once per module per forward, and
// vectorcall takes the module's arguments as they come, with no tuple, dict or argument parsing.
#include "traced_forward.h"

#include <structmember.h>
#include <torch/csrc/Exceptions.h>

#include "garbage_collected.h"
#include "token_stats_recorder.h"

namespace recon_fast::direct {

void ForwardSink::set_record(py::object record) {
  if (!record.is_none() && !PyCallable_Check(record.ptr())) {
    throw py::type_error("ForwardSink.record must be None or a callable record(name, output), got " +
                         std::string(Py_TYPE(record.ptr())->tp_name));
  }
  native_ = py::isinstance<Recorder>(record) ? record.cast<Recorder*>() : nullptr;
  record_ = std::move(record);
}

void ForwardSink::deliver(PyObject* name, PyObject* output) const {
  if (native_ != nullptr) {
    native_->record(name, output);
    return;
  }
  if (record_.is_none()) return;
  PyObject* result = PyObject_CallFunctionObjArgs(record_.ptr(), name, output, nullptr);
  if (result == nullptr) throw py::error_already_set();
  Py_DECREF(result);
}

namespace {

struct TracedForwardObject {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  PyObject* module;    // the module it is the forward of
  PyObject* previous;  // the module's own forward attribute it replaced (accelerate's), or null:
                       // then the class's forward, looked up at each call as self.forward would
  PyObject* name;      // the module's name, as the recorder logs it
  PyObject* sink;      // the Tracer's ForwardSink; null once detached
  PyObject* owner;     // the module's __dict__, where it sits as "forward" while in place
  PyObject* copy_as;   // copy_as(module): what a copy of the module gets as its forward
  ForwardSink* state;  // sink's C++ object (sink keeps it alive)
};

PyTypeObject traced_forward_type = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyObject* forward_string() {
  static PyObject* text = PyUnicode_InternFromString("forward");
  return text;
}

// The forward it calls, as a new reference: the replaced attribute, or the class's forward bound to
// the module (a class patched since, or a __class__ swapped, is followed, as by a forward hook).
PyObject* bound_forward(TracedForwardObject* self) {
  if (self->previous != nullptr) return Py_NewRef(self->previous);
  PyTypeObject* type = Py_TYPE(self->module);
  PyObject* function = _PyType_Lookup(type, forward_string());  // borrowed
  if (function == nullptr) {
    PyErr_Format(PyExc_AttributeError, "'%s' object has no attribute 'forward'", type->tp_name);
    return nullptr;
  }
  descrgetfunc bind = Py_TYPE(function)->tp_descr_get;
  if (bind == nullptr) return Py_NewRef(function);
  return bind(function, self->module, reinterpret_cast<PyObject*>(type));
}

PyObject* traced_forward_call(PyObject* callable, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  auto* self = reinterpret_cast<TracedForwardObject*>(callable);
  if (self->module == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "TracedForward: called after it was cleared");
    return nullptr;
  }
  PyObject* forward = bound_forward(self);
  if (forward == nullptr) return nullptr;
  PyObject* output = PyObject_Vectorcall(forward, args, nargsf, kwnames);
  Py_DECREF(forward);
  if (output == nullptr || self->sink == nullptr || !self->state->armed()) return output;
  // Dropped on the error path (the recorder raised): the module's output never reaches the caller.
  py::object held = py::reinterpret_steal<py::object>(output);
  HANDLE_TH_ERRORS
  self->state->deliver(self->name, output);
  END_HANDLE_TH_ERRORS
  return held.release().ptr();
}

PyObject* traced_forward_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"module", "name", "sink", "previous", "copy_as", nullptr};
  PyObject *module, *name, *sink, *previous, *copy_as;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OUOOO:TracedForward", const_cast<char**>(keywords), &module,
                                   &name, &sink, &previous, &copy_as)) {
    return nullptr;
  }
  if (previous != Py_None && !PyCallable_Check(previous)) {
    PyErr_Format(PyExc_TypeError, "TracedForward: previous must be None or callable, got %s",
                 Py_TYPE(previous)->tp_name);
    return nullptr;
  }
  if (!PyCallable_Check(copy_as)) {
    PyErr_Format(PyExc_TypeError, "TracedForward: copy_as must be callable, got %s", Py_TYPE(copy_as)->tp_name);
    return nullptr;
  }
  ForwardSink* state = nullptr;
  try {
    state = py::handle(sink).cast<ForwardSink*>();
  } catch (const py::cast_error&) {
    PyErr_Format(PyExc_TypeError, "TracedForward: sink must be a recon_fast._C.ForwardSink, got %s",
                 Py_TYPE(sink)->tp_name);
    return nullptr;
  }
  PyObject* owner = PyObject_GenericGetDict(module, nullptr);
  if (owner == nullptr) return nullptr;
  auto* self = reinterpret_cast<TracedForwardObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) {
    Py_DECREF(owner);
    return nullptr;
  }
  self->vectorcall = traced_forward_call;
  self->module = Py_NewRef(module);
  self->previous = previous == Py_None ? nullptr : Py_NewRef(previous);
  self->name = Py_NewRef(name);
  self->sink = Py_NewRef(sink);
  self->owner = owner;
  self->copy_as = Py_NewRef(copy_as);
  self->state = state;
  return reinterpret_cast<PyObject*>(self);
}

int traced_forward_traverse(PyObject* object, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<TracedForwardObject*>(object);
  Py_VISIT(self->module);
  Py_VISIT(self->previous);
  Py_VISIT(self->name);
  Py_VISIT(self->sink);
  Py_VISIT(self->owner);
  Py_VISIT(self->copy_as);
  return 0;
}

int traced_forward_clear(PyObject* object) {
  auto* self = reinterpret_cast<TracedForwardObject*>(object);
  Py_CLEAR(self->module);
  Py_CLEAR(self->previous);
  Py_CLEAR(self->name);
  Py_CLEAR(self->sink);  // state went with it: never read without sink
  Py_CLEAR(self->owner);
  Py_CLEAR(self->copy_as);
  return 0;
}

void traced_forward_dealloc(PyObject* object) {
  PyObject_GC_UnTrack(object);
  traced_forward_clear(object);
  Py_TYPE(object)->tp_free(object);
}

bool in_place(TracedForwardObject* self) {
  if (self->owner == nullptr) return false;
  return PyDict_GetItemWithError(self->owner, forward_string()) == reinterpret_cast<PyObject*>(self);
}

PyObject* traced_forward_in_place(PyObject* object, PyObject*) {
  return PyBool_FromLong(in_place(reinterpret_cast<TracedForwardObject*>(object)));
}

// Its hook was taken off or moved back to a forward hook: from now on it only calls through, and
// lets go of the Tracer's sink (it may stay inside a wrapper that replaced it, or be put back by one).
PyObject* traced_forward_detach(PyObject* object, PyObject*) {
  Py_CLEAR(reinterpret_cast<TracedForwardObject*>(object)->sink);
  Py_RETURN_NONE;
}

PyObject* traced_forward_detached(PyObject* object, void*) {
  return PyBool_FromLong(reinterpret_cast<TracedForwardObject*>(object)->sink == nullptr);
}

PyObject* traced_forward_wrapped(PyObject* object, void*) {
  auto* self = reinterpret_cast<TracedForwardObject*>(object);
  if (self->module == nullptr) Py_RETURN_NONE;
  return bound_forward(self);
}

// copy.deepcopy and pickle: a copy of the module is not traced (a copy of its hooks' dict would
// record into the same Tracer; this records nothing). It gets the forward it replaced, or
// copy_as(module) (module_hooks.ClassForward: the class's forward, the module held weakly).
PyObject* traced_forward_reduce(PyObject* object, PyObject*) {
  auto* self = reinterpret_cast<TracedForwardObject*>(object);
  if (self->module == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "TracedForward: copied after it was cleared");
    return nullptr;
  }
  if (self->previous == nullptr) return Py_BuildValue("(O(O))", self->copy_as, self->module);
  PyObject* copy_module = PyImport_ImportModule("copy");
  if (copy_module == nullptr) return nullptr;
  PyObject* shallow_copy = PyObject_GetAttrString(copy_module, "copy");
  Py_DECREF(copy_module);
  if (shallow_copy == nullptr) return nullptr;
  return Py_BuildValue("(N(O))", shallow_copy, self->previous);
}

PyObject* traced_forward_repr(PyObject* object) {
  auto* self = reinterpret_cast<TracedForwardObject*>(object);
  return PyUnicode_FromFormat("<TracedForward of %R%s>", self->name ? self->name : Py_None,
                              self->sink ? "" : " (detached)");
}

PyMemberDef traced_forward_members[] = {
    {"name", T_OBJECT, offsetof(TracedForwardObject, name), READONLY, "The module's name."},
    {nullptr}};

PyGetSetDef traced_forward_getset[] = {
    {"__wrapped__", traced_forward_wrapped, nullptr, "The forward it calls now (inspect.signature follows it).",
     nullptr},
    {"detached", traced_forward_detached, nullptr, "True once detach() was called: it only calls through.",
     nullptr},
    {nullptr}};

PyMethodDef traced_forward_methods[] = {
    {"in_place", traced_forward_in_place, METH_NOARGS, "Whether it is still its module's forward attribute."},
    {"detach", traced_forward_detach, METH_NOARGS, "From now on it only calls through (lets go of the sink)."},
    {"__reduce__", traced_forward_reduce, METH_NOARGS,
     "Copies and pickles as the forward it replaced, or copy_as(module)."},
    {nullptr}};

// The indices of the wrappers in `forwards` (TracedForwards) that are no longer their module's
// forward attribute (something replaced or removed it): one pass at the start of every run.
py::list displaced_forwards(py::sequence forwards) {
  py::list displaced;
  const Py_ssize_t n = PySequence_Size(forwards.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    py::object item = forwards[i];
    if (Py_TYPE(item.ptr()) != &traced_forward_type) {
      throw py::type_error(std::string("displaced_forwards: a TracedForward was expected, got ") +
                           Py_TYPE(item.ptr())->tp_name);
    }
    if (!in_place(reinterpret_cast<TracedForwardObject*>(item.ptr()))) {
      if (PyErr_Occurred()) throw py::error_already_set();
      displaced.append(i);
    }
  }
  return displaced;
}

}  // namespace

void bind_traced_forward(py::module_& m) {
  // Garbage-collected: its record (a run's Recorder and its callbacks) can lead back to the Tracer holding it.
  py::class_<ForwardSink>(m, "ForwardSink", garbage_collected<ForwardSink>(),
                          "What the TracedForwards of one Tracer record into: record is None (outside a run),\n"
                          "a Recorder (called in C++) or any record(name, output) callable.")
      .def(py::init<>())
      .def_property("record", &ForwardSink::record, &ForwardSink::set_record);

  PyTypeObject* type = &traced_forward_type;
  type->tp_name = "recon_fast._C.TracedForward";
  type->tp_basicsize = sizeof(TracedForwardObject);
  type->tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL;
  type->tp_doc =
      "TracedForward(module, name, sink, previous, copy_as): the module's forward attribute; it calls\n"
      "`previous` (the forward attribute it replaced) or else the class's forward, and hands the output\n"
      "to sink.record(name, output) while a run records. copy_as(module): what a copy of the module\n"
      "gets as its forward.";
  type->tp_vectorcall_offset = offsetof(TracedForwardObject, vectorcall);
  type->tp_call = PyVectorcall_Call;
  type->tp_new = traced_forward_new;
  type->tp_traverse = traced_forward_traverse;
  type->tp_clear = traced_forward_clear;
  type->tp_dealloc = traced_forward_dealloc;
  type->tp_repr = traced_forward_repr;
  type->tp_members = traced_forward_members;
  type->tp_methods = traced_forward_methods;
  type->tp_getset = traced_forward_getset;
  if (PyType_Ready(type) < 0) throw py::error_already_set();
  Py_INCREF(type);
  m.add_object("TracedForward", py::handle(reinterpret_cast<PyObject*>(type)));
  m.def("displaced_forwards", &displaced_forwards, py::arg("forwards"),
        "The indices of the TracedForwards in `forwards` that are no longer their module's forward attribute.");
}

}  // namespace recon_fast::direct
