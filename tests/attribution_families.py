"""Small random-weight causal LMs of the families that direct logit attribution adapts beyond
tests/tiny_models.py's (Gemma, Gemma2, Gemma3, Phi, Phi3, Granite, OLMo2, Cohere, Falcon), each
with the features that need a term of its own switched on and set away from their defaults."""

from __future__ import annotations

import torch
import transformers
from tiny_models import VOCAB, perturb_vectors

_COMMON = dict(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
               max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0, vocab_size=VOCAB)
_KV = dict(num_key_value_heads=2)

# family -> (config class, model class, config fields, attention implementation)
FAMILY_MODELS = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_KV, "head_dim": 12}, "sdpa"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {**_KV, "head_dim": 12, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 2.0,
                "sliding_window": 4, "query_pre_attn_scalar": 10}, "eager"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {**_KV, "head_dim": 12, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
                "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 10}, "sdpa"),
    "phi": ("PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.5, "qk_layernorm": True}, "sdpa"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_KV}, "sdpa"),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                {**_KV, "embedding_multiplier": 3.0, "residual_multiplier": 0.4, "logits_scaling": 4.0,
                 "attention_multiplier": 0.2, "attention_bias": True}, "sdpa"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {**_KV}, "sdpa"),
    "cohere": ("CohereConfig", "CohereForCausalLM", {**_KV, "logit_scale": 0.3, "use_qk_norm": False}, "sdpa"),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               {"num_kv_heads": 4, "new_decoder_architecture": True, "parallel_attn": True, "bias": True,
                "alibi": False, "ffn_hidden_size": 96}, "sdpa"),
}
FAMILIES = list(FAMILY_MODELS)


def make_family_model(family: str, *, seed: int = 0, dtype=torch.float32, attn_implementation: str | None = None):
    """A 2-layer random model of `family`, norm weights and biases perturbed (see perturb_vectors)."""
    config_name, model_name, fields, implementation = FAMILY_MODELS[family]
    torch.manual_seed(seed)
    common = dict(_COMMON)
    if family == "falcon":
        common.pop("intermediate_size")
    config = getattr(transformers, config_name)(**common, **fields)
    config._attn_implementation = attn_implementation or implementation
    model = getattr(transformers, model_name)(config).eval()
    return perturb_vectors(model, seed=seed + 1).to(dtype)
