"""Compatibility: `from recon_fast.logit_lens import logit_lens`, as README.md shows it; the module
is now recon_fast.attribution.logit_lens."""

from recon_fast.attribution.logit_lens import LENS_CHUNK, LogitLens, logit_lens

__all__ = ["LENS_CHUNK", "LogitLens", "logit_lens"]
