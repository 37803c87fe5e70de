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
  PyObject* forward;   // the callable it replaced (the bound forward, or an earlier wrapper)
  PyObject* name;      // the module's name, as the recorder logs it
  PyObject* sink;      // the Tracer's ForwardSink
  PyObject* owner;     // the module's __dict__, where it sits as "forward" while in place
  ForwardSink* state;  // sink's C++ object (sink keeps it alive)
  char inert;          // its hook was taken off or moved back to a forward hook: it only calls through
};

PyTypeObject traced_forward_type = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyObject* forward_string() {
  static PyObject* text = PyUnicode_InternFromString("forward");
  return text;
}

PyObject* traced_forward_call(PyObject* callable, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  auto* self = reinterpret_cast<TracedForwardObject*>(callable);
  if (self->forward == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "TracedForward: called after it was cleared");
    return nullptr;
  }
  PyObject* output = PyObject_Vectorcall(self->forward, args, nargsf, kwnames);
  if (output == nullptr || self->inert || !self->state->armed()) return output;
  // Dropped on the error path (the recorder raised): the module's output never reaches the caller.
  py::object held = py::reinterpret_steal<py::object>(output);
  HANDLE_TH_ERRORS
  self->state->deliver(self->name, output);
  return held.release().ptr();
  END_HANDLE_TH_ERRORS
}

PyObject* traced_forward_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"forward", "name", "sink", "owner", nullptr};
  PyObject *forward, *name, *sink, *owner;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OUOO!:TracedForward", const_cast<char**>(keywords), &forward,
                                   &name, &sink, &PyDict_Type, &owner)) {
    return nullptr;
  }
  if (!PyCallable_Check(forward)) {
    PyErr_Format(PyExc_TypeError, "TracedForward: forward must be callable, got %s", Py_TYPE(forward)->tp_name);
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
  auto* self = reinterpret_cast<TracedForwardObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  self->vectorcall = traced_forward_call;
  Py_INCREF(forward);
  Py_INCREF(name);
  Py_INCREF(sink);
  Py_INCREF(owner);
  self->forward = forward;
  self->name = name;
  self->sink = sink;
  self->owner = owner;
  self->state = state;
  self->inert = 0;
  return reinterpret_cast<PyObject*>(self);
}

int traced_forward_traverse(PyObject* object, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<TracedForwardObject*>(object);
  Py_VISIT(self->forward);
  Py_VISIT(self->name);
  Py_VISIT(self->sink);
  Py_VISIT(self->owner);
  return 0;
}

int traced_forward_clear(PyObject* object) {
  auto* self = reinterpret_cast<TracedForwardObject*>(object);
  Py_CLEAR(self->forward);
  Py_CLEAR(self->name);
  Py_CLEAR(self->sink);
  Py_CLEAR(self->owner);
  self->inert = 1;  // state went with sink
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

// copy.deepcopy and pickle take the forward it replaced: a copied model is not traced (a copy of
// its hooks' dict would record into the same Tracer; this records nothing instead). The usual
// forward, the class's bound to the module, is rebuilt as getattr(module, "forward"): a bound
// method pickles by its function's name, which for a module without a forward of its own
// (ModuleList's _forward_unimplemented) is no attribute of the module.
PyObject* traced_forward_reduce(PyObject* object, PyObject*) {
  auto* self = reinterpret_cast<TracedForwardObject*>(object);
  if (self->forward == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "TracedForward: copied after it was cleared");
    return nullptr;
  }
  if (PyMethod_Check(self->forward)) {
    PyObject* module = PyMethod_GET_SELF(self->forward);
    PyObject* class_forward = PyObject_GetAttr(reinterpret_cast<PyObject*>(Py_TYPE(module)), forward_string());
    if (class_forward == nullptr) return nullptr;
    const bool usual = class_forward == PyMethod_GET_FUNCTION(self->forward);
    Py_DECREF(class_forward);
    if (usual) {
      PyObject* builtins = PyEval_GetBuiltins();  // borrowed
      PyObject* get_attribute = PyDict_GetItemString(builtins, "getattr");  // borrowed
      return Py_BuildValue("(O(OO))", get_attribute, module, forward_string());
    }
  }
  PyObject* copy_module = PyImport_ImportModule("copy");
  if (copy_module == nullptr) return nullptr;
  PyObject* shallow_copy = PyObject_GetAttrString(copy_module, "copy");
  Py_DECREF(copy_module);
  if (shallow_copy == nullptr) return nullptr;
  return Py_BuildValue("(N(O))", shallow_copy, self->forward);
}

PyObject* traced_forward_repr(PyObject* object) {
  auto* self = reinterpret_cast<TracedForwardObject*>(object);
  return PyUnicode_FromFormat("<TracedForward of %R%s>", self->name ? self->name : Py_None,
                              self->inert ? " (inert)" : "");
}

PyMemberDef traced_forward_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(TracedForwardObject, forward), READONLY,
     "The forward it calls (inspect.signature follows it)."},
    {"name", T_OBJECT, offsetof(TracedForwardObject, name), READONLY, "The module's name."},
    {"inert", T_BOOL, offsetof(TracedForwardObject, inert), 0,
     "True: it only calls through (its hook was taken off or moved back to a forward hook)."},
    {nullptr}};

PyMethodDef traced_forward_methods[] = {
    {"in_place", traced_forward_in_place, METH_NOARGS, "Whether it is still its module's forward attribute."},
    {"__reduce__", traced_forward_reduce, METH_NOARGS, "Copies and pickles as the forward it replaced."},
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
      "TracedForward(forward, name, sink, owner): a module's forward attribute that calls `forward`\n"
      "and hands its output to sink.record(name, output) while a run records; owner is the\n"
      "module's __dict__.";
  type->tp_vectorcall_offset = offsetof(TracedForwardObject, vectorcall);
  type->tp_call = PyVectorcall_Call;
  type->tp_new = traced_forward_new;
  type->tp_traverse = traced_forward_traverse;
  type->tp_clear = traced_forward_clear;
  type->tp_dealloc = traced_forward_dealloc;
  type->tp_repr = traced_forward_repr;
  type->tp_members = traced_forward_members;
  type->tp_methods = traced_forward_methods;
  if (PyType_Ready(type) < 0) throw py::error_already_set();
  Py_INCREF(type);
  m.add_object("TracedForward", py::handle(reinterpret_cast<PyObject*>(type)));
  m.def("displaced_forwards", &displaced_forwards, py::arg("forwards"),
        "The indices of the TracedForwards in `forwards` that are no longer their module's forward attribute.");
}

}  // namespace recon_fast::direct
