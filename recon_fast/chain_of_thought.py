"""Deprecated alias: `from recon_fast.chain_of_thought import chain_of_thought`, as older README versions
showed it; the module is recon_fast.attribution.chain_of_thought, where each name resolves with a
DeprecationWarning."""

from recon_fast.moved_paths import forwarding

__all__ = ["CotStep", "chain_of_thought", "split_steps", "steps_to_dict"]
__getattr__, __dir__ = forwarding(__name__, "recon_fast.attribution.chain_of_thought", __all__)
