"""Deprecated alias: `recon_fast.kernels.ops`, token_stats' face before it was named for its op, is
recon_fast.kernels.token_stats; each name resolves there with a DeprecationWarning."""

from recon_fast.moved_paths import forwarding

__all__ = ["NUM_STATS", "STATS", "TokenStatsRecorder", "backend", "cpu_kernel", "direct_available", "stats_shape",
           "token_stats", "token_stats_ref", "token_stats_rows_grouped", "token_stats_rows_into"]
__getattr__, __dir__ = forwarding(__name__, "recon_fast.kernels.token_stats", __all__)
