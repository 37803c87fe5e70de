"""recon-fast: a fast activation tracer for PyTorch / Hugging Face transformers.

`recon_fast.ops.token_stats` is the fused per-token statistics kernel everything rests on.
"""

__version__ = "0.1.0"

from recon_fast.ops import STATS, backend, token_stats, token_stats_ref
from recon_fast.cube import ActivityCube
from recon_fast.tracer import RawSlices, Tracer
from recon_fast.compat import ReconTracer

__all__ = ["ActivityCube", "RawSlices", "ReconTracer", "STATS", "Tracer", "backend", "token_stats", "token_stats_ref", "__version__"]
