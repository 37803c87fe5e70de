"""Small random-weight models built from configs, one per architecture family the tracer must
handle, and an independent way to see what their modules output (plain torch hooks)."""

from __future__ import annotations

import torch
from original_recon_trace import first_tensor  # the original tool's rule, written once for the tests
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 96


def make_model(arch: str, *, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "attn_implementation": attn_implementation}
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=48, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0, **common)
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                             pad_token_id=0, **common)
        model = LlamaForCausalLM(config)
    elif arch in ("neox", "neox-sequential"):
        config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                               max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                               use_parallel_residual=arch == "neox", **common)
        model = GPTNeoXForCausalLM(config)
    elif arch in LLAMA_LIKE:
        config_class, model_class = LLAMA_LIKE[arch]
        config = config_class(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=12, max_position_embeddings=128, bos_token_id=0,
                              eos_token_id=0, pad_token_id=0, **common)
        model = model_class(config)
    elif arch == "bert":
        config = BertConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                            max_position_embeddings=128, **common)
        model = BertModel(config)
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ["gpt2", "llama", "neox", "bert"]
LLAMA_LIKE = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
              "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
# Causal LMs that direct logit attribution has adapters for (GPT-NeoX with both residual layouts).
CAUSAL_ARCHS = ["gpt2", "llama", "neox", "neox-sequential", *LLAMA_LIKE]


def perturb_vectors(model: torch.nn.Module, seed: int = 1, scale: float = 0.5) -> torch.nn.Module:
    """Random norm weights and biases: freshly built models have weight 1 and bias 0, under which
    a forgotten norm weight or bias term would go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def capture_outputs(model: torch.nn.Module, names: list[str], call) -> list[tuple[str, torch.Tensor]]:
    """Runs call() with plain forward hooks on `names`; returns (name, output copy) in firing order."""
    modules = dict(model.named_modules())
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name in names:
        def hook(module, inputs, output, name=name):
            t = first_tensor(output)
            if t is not None:
                seen.append((name, t.detach().clone()))
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return seen


def per_token_float64(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., 5] in float64: energy, mean, std (unbiased), min, max. Written out
    independently of recon_fast's own reference."""
    x = t.double()
    mean = x.mean(-1)
    centred = x - mean.unsqueeze(-1)
    std = (centred.pow(2).sum(-1) / (x.shape[-1] - 1)).sqrt()
    return torch.stack([x.pow(2).sum(-1).sqrt(), mean, std, x.amin(-1), x.amax(-1)], dim=-1)
