"""recon-fast: a fast activation tracer for PyTorch / Hugging Face transformers.

`recon_fast.token_stats` (recon_fast.kernels.token_stats) is the fused per-token statistics kernel everything rests on.
"""

from recon_fast._version import __version__

from recon_fast.kernels.token_stats import STATS, backend, token_stats, token_stats_ref
from recon_fast.cube.cube import ActivityCube
from recon_fast.trace.raw_capture import RawSlices
from recon_fast.trace.tracer import Tracer
from recon_fast.trace.compat import ReconTracer
from recon_fast.attribution.direct import attribute_positions, direct_logit_attribution
from recon_fast.attribution.result import Attribution
import recon_fast.ops  # noqa: F401  (the deprecated recon_fast.ops alias: an attribute after `import recon_fast`, as before)

# logit_lens() and chain_of_thought() stay in their modules: exported here under the same names
# as those modules, they would shadow them (`import recon_fast.logit_lens` would give a function).
__all__ = ["ActivityCube", "Attribution", "RawSlices", "ReconTracer", "STATS", "Tracer", "attribute_positions",
           "backend", "direct_logit_attribution", "token_stats", "token_stats_ref", "__version__"]
