"""Why did the model say that: where each family keeps its parts (anatomy.py), rows kept at chosen
positions (position_capture.py), direct logit attribution (direct.py), the logit lens
(logit_lens.py) and chain of thought (chain_of_thought.py).

logit_lens() and chain_of_thought() are not exported here: under the names of their modules they
would shadow them (`import recon_fast.attribution.logit_lens` would give a function)."""

from recon_fast.attribution.direct import Attribution, attribute_positions, direct_logit_attribution

__all__ = ["Attribution", "attribute_positions", "direct_logit_attribution"]
