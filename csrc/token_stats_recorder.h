// The tracer's eager hook path in C++ (recon_fast._C.Recorder): every forward hook of one traced
// pass calls a Recorder with (module name, module output). For the usual output, a plain floating
// [B, T, D] tensor (alone or first in a tuple) that needs no grad, on a device the direct
// launchers serve, it does what the Python recorder (recon_fast/trace/stats_capture.py:
// fast_recorder) does: reserves the rows in the arena's chunk, queues the tensor (or writes it at
// once), launches the group at its end, and logs the call; any other output goes to the Python
// recorder it was given. On the host-bound proxy (365 hooks, T=8) the Python recorder cost ~2.5 us
// a hook and made ~2000 Python objects a pass; this path makes none until the calls are read.
//
// The arena (recon_fast/trace/stats_arena.py: StatsArena) stays the owner of its chunks: while a
// Recorder writes a device's rows, the arena has lent it that device's cursor (the chunk being
// written, its fill and the queued group), and any arena method called from Python first takes it
// back (give_back), so the two never write the same rows. New chunks, host copies and the
// in-place-edit error are the arena's, called from here.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace recon_fast::direct {

namespace py = pybind11;

// Hidden, as pybind11's own types are: a bound class of default visibility holding its types
// draws -Wattributes from g++.
class __attribute__((visibility("hidden"))) Recorder {
 public:
  // arena: the session's StatsArena; fallback(name, output): the Python recorder, for any output
  // this one does not take; group_ends / eager: sets of module names (a group is launched at the
  // hook of a module in group_ends; modules in eager are written at their hook); grouped: False
  // writes every output at its hook.
  Recorder(py::object arena, py::object fallback, py::object group_ends, py::object eager, bool grouped);

  // The hook's call (Recorder.__call__).
  void record(py::handle name, py::handle output);
  // Hands the lent cursor back to the arena: its fill, the queued group (as the arena's own
  // pending entries) and the counters. Nothing is launched. Safe to call when nothing is lent.
  void give_back();
  // After the pass: gives back and lets go of the arena and the callbacks (the log stays).
  void close();

  // The log: one entry per call of the pass, in order: those taken here, as numbers, and the
  // Call objects the Python recorders made (add). drain appends a Call for each entry not
  // drained yet to `calls` (call_type: session.Call, slot_type: stats_arena.ArenaSlot).
  void add(py::object call);
  void drain(py::list calls, py::handle call_type, py::handle slot_type);
  // Whether `other` logged the same calls (module, shape, device, chunk, rows, axis, step; the
  // Python recorders' Calls equal, and keeping no raw slice).
  bool same_calls(const Recorder& other) const;
  int64_t size() const { return static_cast<int64_t>(log_.size()); }
  int64_t drained() const { return static_cast<int64_t>(drained_); }

  py::object on_hook;  // called with the module name after each call taken here (None: not)
  py::object axis;     // the session's token axis, logged with each call
  int64_t step = -1;   // the generate() pass of the calls (-1 outside generate)

  // Garbage collection: the Recorder refers to the session's objects, which refer back to it.
  int traverse(visitproc visit, void* arg) const;
  void clear();

 private:
  struct Pending {
    at::Tensor x;
    int64_t row0;
    int64_t version;  // x._version at the hook: moved means edited in place since
    py::object name;
    int64_t bytes;
  };
  struct Entry {
    py::object name;
    py::object axis;
    int64_t batch, tokens;
    int64_t chunk, row0, rows, step;
    int32_t device;   // index into devices_
    py::object call;  // a Python recorder's Call (add); null for the calls taken here
  };

  bool copy_repeat(const at::Tensor& x, int64_t row0, int64_t rows);  // see last_written_
  void remember_written(const at::Tensor& x, int64_t row0);
  void forget_written();
  bool lend(py::handle x);      // asks the arena for x's device cursor; false: not one served here
  void launch_group();          // the arena's launch(): every device's queued group
  void launch_own();            // the lent device's group, one grouped launch
  void new_chunk(py::handle x, int64_t rows);
  void write(const at::Tensor& x, int64_t row0);
  bool write_contiguous_cpu(const at::Tensor& x, int64_t row0);

  py::object arena_, fallback_, group_ends_, eager_;
  bool grouped_;

  // The lent cursor (holding_): the arena's _DeviceChunks for device_, and its fields.
  bool holding_ = false;
  py::object chunks_;
  at::Device device_{at::kCPU};
  int32_t device_slot_ = -1;
  at::Tensor last_;  // the chunk being written (undefined: none yet, capacity -1)
  int64_t index_ = -1, capacity_ = -1, fill_ = 0;
  std::vector<Pending> pending_;
  int64_t own_bytes_ = 0;    // of pending_
  int64_t other_bytes_ = 0;  // queued on other devices when lent (they cannot change meanwhile)
  int64_t peak_ = 0, group_bytes_ = 0, launches_ = 0, launched_ = 0, repeats_ = 0;

  // The last output written at its hook on the CPU, held weakly (its TensorImpl cannot be reused
  // for another tensor while this is held, and its storage is not kept). Modules often return a
  // child's output itself (a Llama MLP returns down_proj's tensor, its attention o_proj's as the
  // first item): when a call brings that tensor again, unchanged (same _version) and viewed the
  // same way, its rows are copied from the earlier call's rows instead of read again.
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> last_written_{
      c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
  int64_t last_written_version_ = -1, last_written_row0_ = -1;
  const void* last_written_data_ = nullptr;
  c10::ScalarType last_written_dtype_ = c10::ScalarType::Undefined;
  c10::SmallVector<int64_t, 4> last_written_sizes_, last_written_strides_;

  std::vector<at::Device> refused_;      // devices the arena did not lend (no direct launchers)
  std::vector<at::Device> device_keys_;  // the devices of the log's entries
  std::vector<py::object> devices_;      // the same, as torch.device objects
  std::vector<Entry> log_;
  size_t drained_ = 0;
};

// Registers recon_fast._C.Recorder (called from the module init in ops.cpp).
void bind_recorder(py::module_& m);

}  // namespace recon_fast::direct
