"""Deprecated alias: `from recon_fast.logit_lens import logit_lens`, as older README versions showed it;
the module is recon_fast.attribution.logit_lens, where each name resolves with a DeprecationWarning."""

from recon_fast.moved_paths import forwarding

__all__ = ["LENS_CHUNK", "LogitLens", "logit_lens"]
__getattr__, __dir__ = forwarding(__name__, "recon_fast.attribution.logit_lens", __all__)
