"""Compatibility: `recon_fast.ops`, the path README.md shows (`recon_fast.ops.token_stats`,
`recon_fast.ops.backend`), is now recon_fast.kernels.ops; this module re-exports its public names."""

from recon_fast.kernels.ops import NUM_STATS, STATS, backend, cpu_kernel, stats_shape, token_stats, token_stats_ref

__all__ = ["NUM_STATS", "STATS", "backend", "cpu_kernel", "stats_shape", "token_stats", "token_stats_ref"]
