"""Tracing a model: hook selection (presets.py), model inputs and state (model_inputs.py,
model_state.py), the Tracer and its session (tracer.py), the session's records and the capture
protocol (session.py), the run's layout (layout.py), and one module per capture kind, each owning
its device buffer and its part of the cube: token statistics (stats_capture.py at the hook and
after the pass, stats_arena.py; compiled_capture.py in a compiled model's graph), raw slices
(raw_capture.py) and attention (attention_stats_capture.py, attention_capture.py).
compat.py is the ReconTracer drop-in."""

from recon_fast.trace.compat import ReconTracer
from recon_fast.trace.raw_capture import RawSlices
from recon_fast.trace.tracer import Tracer

__all__ = ["RawSlices", "ReconTracer", "Tracer"]
