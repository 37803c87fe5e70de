"""Compatibility: `from recon_fast.chain_of_thought import chain_of_thought`, as README.md shows it;
the module is now recon_fast.attribution.chain_of_thought."""

from recon_fast.attribution.chain_of_thought import CotStep, chain_of_thought, split_steps, steps_to_dict

__all__ = ["CotStep", "chain_of_thought", "split_steps", "steps_to_dict"]
