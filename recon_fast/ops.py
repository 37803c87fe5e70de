"""Deprecated alias: `recon_fast.ops`, the path older README versions showed (`recon_fast.ops.token_stats`,
`recon_fast.ops.backend`), is recon_fast.kernels.token_stats; each name resolves there with a DeprecationWarning."""

from recon_fast.moved_paths import forwarding

__all__ = ["NUM_STATS", "STATS", "backend", "cpu_kernel", "stats_shape", "token_stats", "token_stats_ref"]
__getattr__, __dir__ = forwarding(__name__, "recon_fast.kernels.token_stats", __all__)
