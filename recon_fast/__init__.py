"""recon-fast: a fast activation tracer for PyTorch / Hugging Face transformers.

`recon_fast.ops.token_stats` is the fused per-token statistics kernel everything rests on.
"""

from recon_fast.ops import STATS, backend, token_stats, token_stats_ref

__version__ = "0.1.0"

__all__ = ["STATS", "backend", "token_stats", "token_stats_ref", "__version__"]
