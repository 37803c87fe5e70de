"""Why did the model say that: where each family keeps its parts (anatomy.py), rows kept at chosen
positions (position_capture.py) and attention rows at them (source_capture.py), direct logit
attribution in three parts: the entry points (direct.py), the math (decomposition.py) and the
result (result.py: Attribution), whose term labels follow recon_fast.attribution_labels; the logit
lens (logit_lens.py) and chain of thought (chain_of_thought.py).

logit_lens() and chain_of_thought() are not exported here: under the names of their modules they
would shadow them (`import recon_fast.attribution.logit_lens` would give a function)."""

from recon_fast.attribution.direct import attribute_positions, direct_logit_attribution
from recon_fast.attribution.result import Attribution

__all__ = ["Attribution", "attribute_positions", "direct_logit_attribution"]
