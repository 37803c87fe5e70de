"""recon-fast: a fast activation tracer for PyTorch / Hugging Face transformers.

`recon_fast.ops.token_stats` is the fused per-token statistics kernel everything rests on.
"""

__version__ = "0.1.0"

from recon_fast.ops import STATS, backend, token_stats, token_stats_ref
from recon_fast.cube import ActivityCube
from recon_fast.tracer import RawSlices, Tracer
from recon_fast.compat import ReconTracer
from recon_fast.attribution import Attribution, attribute_positions, direct_logit_attribution
from recon_fast.logit_lens import LogitLens, logit_lens
from recon_fast.chain_of_thought import chain_of_thought

__all__ = ["ActivityCube", "Attribution", "LogitLens", "RawSlices", "ReconTracer", "STATS", "Tracer",
           "attribute_positions", "backend", "chain_of_thought", "direct_logit_attribution", "logit_lens",
           "token_stats", "token_stats_ref", "__version__"]
