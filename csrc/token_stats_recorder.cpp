// recon_fast._C.Recorder: the tracer's eager hook path (see token_stats_recorder.h). Every branch
// mirrors recon_fast/trace/stats_capture.py: fast_recorder and stats_arena.StatsArena.defer /
// write / launch, which stay the path for everything this one hands back (other outputs, devices
// without direct launchers, a build without this class) and the reference its tests hold it to.
// One addition is this class's own: a repeated output's rows copied on the CPU (copy_repeat).
#include "token_stats_recorder.h"

#include <torch/csrc/autograd/python_variable.h>

#include <cstring>
#include <optional>
#include <utility>

#include "garbage_collected.h"
#include "token_stats_direct.h"
#include "token_stats_plan.h"
#include "token_stats_problem.h"
#include "token_stats_rows.h"

namespace recon_fast::direct {

namespace {

// Work below this many elements runs with the GIL held: letting it go and taking it back cost the
// host-bound proxy's 365 small writes ~0.1 us each (issue 17), more than such a write itself, and
// no other thread gets anything done in that time.
constexpr int64_t kReleaseGilElements = int64_t{1} << 16;

// The tensor of a module output the fast path takes: the output itself, or the first item of a
// tuple, when it is a plain torch.Tensor (subclasses, Parameters included, take the Python path);
// or, for an output neither a tuple nor a list, its last_hidden_state, as session.extract_tensor
// reads it (a Hugging Face base model's ModelOutput inside its CausalLM: one such call a run took
// the Python recorder, and made the arena lend its cursor twice more). `held` keeps what the
// attribute gave alive.
PyObject* plain_tensor(PyObject* output, py::object& held) {
  PyTypeObject* tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  if (Py_TYPE(output) == tensor_type) return output;
  if (PyTuple_Check(output)) {
    if (!PyTuple_CheckExact(output) || PyTuple_GET_SIZE(output) == 0) return nullptr;
    PyObject* first = PyTuple_GET_ITEM(output, 0);
    return Py_TYPE(first) == tensor_type ? first : nullptr;
  }
  if (PyList_Check(output) || PyType_IsSubtype(Py_TYPE(output), tensor_type)) return nullptr;
  static PyObject* name = PyUnicode_InternFromString("last_hidden_state");
  PyObject* hidden = PyObject_GetAttr(output, name);
  if (hidden == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
    PyErr_Clear();  // getattr(output, "last_hidden_state", None)
    return nullptr;
  }
  held = py::reinterpret_steal<py::object>(hidden);
  return Py_TYPE(hidden) == tensor_type ? hidden : nullptr;
}

bool contains(const py::object& names, py::handle name) {
  if (PySet_GET_SIZE(names.ptr()) == 0) return false;
  const int found = PySet_Contains(names.ptr(), name.ptr());
  if (found < 0) throw py::error_already_set();
  return found == 1;
}

// A set or frozenset of the names in `names` (any iterable), for PySet_Contains.
py::object as_set(py::object names) {
  if (PyAnySet_Check(names.ptr())) return names;
  return py::reinterpret_steal<py::object>(PyFrozenSet_New(names.ptr()));
}

bool same_text(const py::object& a, const py::object& b) { return a.ptr() == b.ptr() || a.equal(b); }

}  // namespace

Recorder::Recorder(py::object arena, py::object fallback, py::object group_ends, py::object eager, bool grouped)
    : on_hook(py::none()),
      axis(py::str("tokens")),
      arena_(std::move(arena)),
      fallback_(std::move(fallback)),
      group_ends_(as_set(std::move(group_ends))),
      eager_(as_set(std::move(eager))),
      grouped_(grouped) {}

void Recorder::record(py::handle name, py::handle output) {
  TORCH_CHECK(!arena_.is_none(), "Recorder: called after close() (its pass is over)");
  py::object held;
  PyObject* t = plain_tensor(output.ptr(), held);
  if (t == nullptr) {
    fallback_(name, output);
    return;
  }
  const at::Tensor& x = THPVariable_Unpack(t);
  // stats_capture.fast_recorder's conditions: [B, T, D], D > 0, no grad, floating.
  if (x.dim() != 3 || x.size(2) == 0 || x.requires_grad() || !x.is_floating_point() ||
      x.layout() != at::kStrided) {
    fallback_(name, output);
    return;
  }
  if (!holding_ || x.device() != device_) {
    if (!lend(t)) {
      fallback_(name, output);
      return;
    }
  }
  const int64_t batch = x.size(0), tokens = x.size(1);
  const int64_t rows = batch * tokens;
  const bool queued = grouped_ && !contains(eager_, name);
  if (fill_ + rows > capacity_) new_chunk(t, rows);
  const int64_t row0 = fill_;
  fill_ += rows;
  const int64_t chunk = index_;
  const int32_t device = device_slot_;
  if (queued && !x.is_inference()) {  // an inference tensor keeps no version counter: written now
    const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
    pending_.push_back({x, row0, x._version(), py::reinterpret_borrow<py::object>(name), bytes});
    own_bytes_ += bytes;
    const int64_t held = other_bytes_ + own_bytes_;
    if (held > peak_) peak_ = held;
    if (held >= group_bytes_) launch_group();
  } else if (!copy_repeat(x, row0, rows)) {
    write(x, row0);
    remember_written(x, row0);
  }
  if (queued && contains(group_ends_, name)) launch_group();
  log_.push_back({py::reinterpret_borrow<py::object>(name), axis, batch, tokens, chunk, row0, rows, step, device, {}});
  if (!on_hook.is_none()) on_hook(name);
}

void Recorder::write(const at::Tensor& x, int64_t row0) {
  if (x.numel() < kReleaseGilElements && write_contiguous_cpu(x, row0)) return;
  std::optional<py::gil_scoped_release> no_gil;  // as the direct launcher's binding does, for big work
  if (x.numel() >= kReleaseGilElements) no_gil.emplace();
  token_stats_rows_into(x, last_, row0);
}

bool Recorder::write_contiguous_cpu(const at::Tensor& x, int64_t row0) {
  // The usual small output on the CPU: a contiguous [B, T, D] tensor of a dtype token_stats takes,
  // none of the dispatch keys the direct launcher hands to the op, into the lent chunk (which the
  // arena made a contiguous float32 [capacity, kNumStats] tensor, and record() reserved the rows
  // in): the problem is written down here. The op's plan (its checks, the device routing, the
  // merging of row dims) took ~30% of such a write's time in the host-bound proxy's forward
  // (perf, issue 17); anything else takes that path, with its checks and messages.
  if (!x.is_cpu() || !last_.is_cpu() || !x.is_contiguous() || x.is_neg() || x._is_zerotensor()) return false;
  const std::optional<StatsDtype> dtype = stats_dtype(x.scalar_type());
  if (!dtype.has_value()) return false;
  TORCH_INTERNAL_ASSERT(last_.is_contiguous() && last_.scalar_type() == at::kFloat && last_.dim() == 2 &&
                        last_.size(1) == kNumStats && row0 >= 0 && row0 + x.numel() / x.size(-1) <= last_.size(0));
  TokenStatsProblem p;
  p.x = x.const_data_ptr();
  p.dtype = *dtype;
  p.dim = x.size(-1);
  p.rows = x.numel() / p.dim;
  p.out = last_.data_ptr<float>() + row0 * kNumStats;
  p.x_rows.ndim = p.out_rows.ndim = 1;
  p.x_rows.sizes[0] = p.out_rows.sizes[0] = p.rows;
  p.x_rows.strides[0] = p.dim;
  p.out_rows.strides[0] = kNumStats;
  cpu::token_stats_problem_cpu(p);
  return true;
}

bool Recorder::copy_repeat(const at::Tensor& x, int64_t row0, int64_t rows) {
  // The weak reference keeps the TensorImpl's memory, so equal addresses while it is alive mean
  // the same tensor object. What it holds is checked too: `x.data = ...` swaps a tensor's storage,
  // dtype or view without moving its version. (Writes that bypass the version counter, through
  // .data or numpy, are not seen: the copy trusts the version, as grouped launches do.)
  if (last_written_._unsafe_get_target() != x.unsafeGetTensorImpl() || last_written_.expired() ||
      x._version() != last_written_version_ || x.scalar_type() != last_written_dtype_ || x.const_data_ptr() != last_written_data_ ||
      x.sizes() != c10::IntArrayRef(last_written_sizes_) || x.strides() != c10::IntArrayRef(last_written_strides_)) {
    return false;
  }
  // Both rows are in the chunk being written: a new chunk is lent only after give_back(), which
  // forgets the tensor.
  float* stats = last_.data_ptr<float>();
  std::memcpy(stats + row0 * kNumStats, stats + last_written_row0_ * kNumStats, sizeof(float) * kNumStats * rows);
  ++repeats_;
  return true;
}

void Recorder::remember_written(const at::Tensor& x, int64_t row0) {
  // Only where a row copy is a memcpy: a CPU chunk, [capacity, 5] contiguous.
  if (!x.is_cpu() || x.is_inference() || !last_.is_contiguous()) return;
  last_written_ = decltype(last_written_)(x.getIntrusivePtr());
  last_written_version_ = x._version();
  last_written_row0_ = row0;
  last_written_dtype_ = x.scalar_type();
  last_written_data_ = x.const_data_ptr();  // not data_ptr(): that would materialise a copy-on-write tensor
  last_written_sizes_.assign(x.sizes().begin(), x.sizes().end());
  last_written_strides_.assign(x.strides().begin(), x.strides().end());
}

void Recorder::forget_written() { last_written_.reset(); }

bool Recorder::lend(py::handle x) {
  const at::Tensor& tensor = THPVariable_Unpack(x.ptr());
  for (const at::Device& device : refused_) {
    if (device == tensor.device()) return false;
  }
  give_back();
  py::object chunks = arena_.attr("_lend")(x, py::cast(this, py::return_value_policy::reference));
  if (chunks.is_none()) {
    refused_.push_back(tensor.device());
    return false;
  }
  py::object last = chunks.attr("last");
  last_ = last.is_none() ? at::Tensor() : THPVariable_Unpack(last.ptr());
  index_ = chunks.attr("index").cast<int64_t>();
  capacity_ = chunks.attr("capacity").cast<int64_t>();
  fill_ = chunks.attr("fill").cast<int64_t>();
  // The device's queued group, if the arena gathered one, goes on from here.
  own_bytes_ = 0;
  for (py::handle item : chunks.attr("pending")) {
    py::tuple entry = py::reinterpret_borrow<py::tuple>(item);  // (x, row0, version, name)
    const at::Tensor& queued = THPVariable_Unpack(entry[0].ptr());
    const int64_t bytes = queued.numel() * static_cast<int64_t>(queued.element_size());
    pending_.push_back({queued, entry[1].cast<int64_t>(), entry[2].cast<int64_t>(), entry[3], bytes});
    own_bytes_ += bytes;
  }
  chunks.attr("pending") = py::list();
  other_bytes_ = arena_.attr("pending_bytes").cast<int64_t>() - own_bytes_;
  peak_ = arena_.attr("peak_pending_bytes").cast<int64_t>();
  group_bytes_ = arena_.attr("group_bytes").cast<int64_t>();
  device_ = tensor.device();
  device_slot_ = -1;
  for (size_t i = 0; i < device_keys_.size(); ++i) {
    if (device_keys_[i] == device_) device_slot_ = static_cast<int32_t>(i);
  }
  if (device_slot_ < 0) {
    device_slot_ = static_cast<int32_t>(device_keys_.size());
    device_keys_.push_back(device_);
    devices_.push_back(chunks.attr("device"));
  }
  chunks_ = std::move(chunks);
  holding_ = true;
  return true;
}

void Recorder::give_back() {
  if (!holding_) return;
  holding_ = false;
  forget_written();  // the arena may write or move the chunk's rows until it lends it again
  py::list pending;
  for (Pending& p : pending_) {
    py::object x = py::reinterpret_steal<py::object>(THPVariable_Wrap(p.x));
    pending.append(py::make_tuple(x, p.row0, p.version, p.name));
  }
  pending_.clear();
  py::object chunks = std::move(chunks_);
  chunks_ = py::none();
  last_ = at::Tensor();
  chunks.attr("pending") = pending;
  chunks.attr("fill") = fill_;
  arena_.attr("pending_bytes") = other_bytes_ + own_bytes_;
  if (peak_ > arena_.attr("peak_pending_bytes").cast<int64_t>()) arena_.attr("peak_pending_bytes") = peak_;
  arena_.attr("launches") = arena_.attr("launches").cast<int64_t>() + launches_;
  arena_.attr("launched") = arena_.attr("launched").cast<int64_t>() + launched_;
  arena_.attr("repeats") = arena_.attr("repeats").cast<int64_t>() + repeats_;
  arena_.attr("_lent") = py::none();
  own_bytes_ = other_bytes_ = launches_ = launched_ = repeats_ = 0;
}

void Recorder::launch_group() {
  if (other_bytes_ == 0) return launch_own();
  // Another device has a group queued: the arena launches them all, as its launch() does.
  give_back();
  arena_.attr("launch")();
}

void Recorder::launch_own() {
  if (pending_.empty()) return;
  std::vector<Pending> group;
  group.swap(pending_);
  own_bytes_ = 0;
  py::list edited;
  for (const Pending& p : group) {
    if (p.x._version() != p.version) edited.append(p.name);
  }
  if (!edited.empty()) arena_.attr("_refuse_edited")(edited);  // raises InPlaceEdit naming them
  ++launches_;
  launched_ += static_cast<int64_t>(group.size());
  std::vector<at::Tensor> xs;
  std::vector<int64_t> row0s;
  xs.reserve(group.size());
  row0s.reserve(group.size());
  for (const Pending& p : group) {
    xs.push_back(p.x);
    row0s.push_back(p.row0);
  }
  int64_t elements = 0;
  for (const at::Tensor& x : xs) elements += x.numel();
  {
    std::optional<py::gil_scoped_release> no_gil;
    if (elements >= kReleaseGilElements) no_gil.emplace();
    token_stats_rows_grouped_into(xs, last_, row0s);
  }
  // The activations are let go here, with the GIL held (a tensor's last reference may be its
  // Python object's).
}

void Recorder::new_chunk(py::handle x, int64_t rows) {
  py::object chunks = chunks_;
  give_back();
  arena_.attr("_new_chunk")(chunks, rows);
  TORCH_INTERNAL_ASSERT(lend(x), "Recorder: the arena refused a device it had lent");
}

void Recorder::close() {
  give_back();
  arena_ = fallback_ = group_ends_ = eager_ = on_hook = chunks_ = py::none();
}

void Recorder::add(py::object call) { log_.push_back({{}, {}, 0, 0, 0, 0, 0, 0, -1, std::move(call)}); }

void Recorder::drain(py::list calls, py::handle call_type, py::handle slot_type) {
  py::object none = py::none();
  for (; drained_ < log_.size(); ++drained_) {
    const Entry& e = log_[drained_];
    if (e.call) {
      calls.append(e.call);
      continue;
    }
    py::object slot = slot_type(devices_[e.device], e.chunk, e.row0, e.rows);
    calls.append(call_type(e.name, py::make_tuple(e.batch, e.tokens), slot, none, e.axis, e.step, none));
  }
}

bool Recorder::same_calls(const Recorder& other) const {
  if (log_.size() != other.log_.size()) return false;
  for (size_t i = 0; i < log_.size(); ++i) {
    const Entry& a = log_[i];
    const Entry& b = other.log_[i];
    if (a.call || b.call) {
      if (!a.call || !b.call || !a.call.attr("raw").is_none() || !b.call.attr("raw").is_none() ||
          !a.call.equal(b.call)) {
        return false;
      }
      continue;
    }
    if (a.batch != b.batch || a.tokens != b.tokens || a.chunk != b.chunk || a.row0 != b.row0 || a.rows != b.rows ||
        a.step != b.step || device_keys_[a.device] != other.device_keys_[b.device] || !same_text(a.name, b.name) ||
        !same_text(a.axis, b.axis)) {
      return false;
    }
  }
  return true;
}

int Recorder::traverse(visitproc visit, void* arg) const {
  for (const py::object* o : {&arena_, &fallback_, &group_ends_, &eager_, &on_hook, &chunks_}) {
    Py_VISIT(o->ptr());
  }
  return 0;
}

void Recorder::clear() {
  pending_.clear();
  forget_written();
  holding_ = false;
  arena_ = fallback_ = group_ends_ = eager_ = on_hook = chunks_ = py::none();
}

void bind_recorder(py::module_& m) {
  // Garbage-collected: the session holds its Recorder, whose fallback holds the session.
  py::class_<Recorder>(m, "Recorder", garbage_collected<Recorder>(),
                       "The tracer's eager hook path for one pass: Recorder(arena, fallback, group_ends, eager,\n"
                       "grouped)(name, output) records a module output as stats_capture.fast_recorder would.")
      .def(py::init<py::object, py::object, py::object, py::object, bool>(), py::arg("arena"), py::arg("fallback"),
           py::arg("group_ends"), py::arg("eager"), py::arg("grouped"))
      .def("__call__", &Recorder::record, py::arg("name"), py::arg("output"))
      .def("give_back", &Recorder::give_back, "Hands the lent cursor back to the arena (launches nothing).")
      .def("close", &Recorder::close, "After the pass: gives back, lets go of the arena and callbacks; keeps the log.")
      .def("add", &Recorder::add, py::arg("call"), "Logs a Call made by a Python recorder, in order.")
      .def("drain", &Recorder::drain, py::arg("calls"), py::arg("call_type"), py::arg("slot_type"),
           "Appends a Call for each logged call not drained yet.")
      .def("same_calls", &Recorder::same_calls, py::arg("other"), "Whether other logged the same calls.")
      .def("__len__", &Recorder::size)
      .def_property_readonly("drained", &Recorder::drained)
      .def_readwrite("on_hook", &Recorder::on_hook)
      .def_readwrite("axis", &Recorder::axis)
      .def_readwrite("step", &Recorder::step);
}

}  // namespace recon_fast::direct
