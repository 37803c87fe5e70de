"""Where a causal language model keeps the parts that write into its residual stream: embeddings,
each block's attention (and its output projection, for per-head terms) and MLP, the final norm and
the unembedding. One small adapter per architecture family says where; the attribution math in
recon_fast.attribution is written once against this description."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn



@dataclass(frozen=True)
class FamilyLayout:
    """Module paths of one architecture family, relative to the causal-LM model."""

    embed: str
    pos_embed: str | None
    blocks: str
    attn: str  # relative to a block; its output is the attention's write to the residual stream
    out_proj: str  # relative to a block; its input holds every head's output side by side
    mlp: str  # relative to a block
    final_norm: str
    unembed: tuple[str, ...]  # first one present wins (names changed across transformers versions)


_GPT2 = FamilyLayout(embed="transformer.wte", pos_embed="transformer.wpe", blocks="transformer.h",
                     attn="attn", out_proj="attn.c_proj", mlp="mlp", final_norm="transformer.ln_f",
                     unembed=("lm_head",))
_LLAMA = FamilyLayout(embed="model.embed_tokens", pos_embed=None, blocks="model.layers", attn="self_attn",
                      out_proj="self_attn.o_proj", mlp="mlp", final_norm="model.norm", unembed=("lm_head",))
_NEOX = FamilyLayout(embed="gpt_neox.embed_in", pos_embed=None, blocks="gpt_neox.layers", attn="attention",
                     out_proj="attention.dense", mlp="mlp", final_norm="gpt_neox.final_layer_norm",
                     unembed=("lm_head", "embed_out"))

# model_type -> layout. Only families whose residual stream is exactly embeddings + attention +
# MLP outputs belong here: Gemma (scaled embeddings, post-norms), Granite (residual multipliers)
# or Cohere (logit scale) would need terms of their own.
FAMILIES: dict[str, FamilyLayout] = {
    "gpt2": _GPT2,
    "llama": _LLAMA,  # SmolLM2 too
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt_neox": _NEOX,
}


@dataclass(frozen=True)
class Block:
    module: nn.Module
    attn: nn.Module
    out_proj: nn.Module
    mlp: nn.Module


@dataclass(frozen=True)
class FinalNorm:
    """The final normalisation: kind "layernorm" (centre, divide by std) or "rmsnorm" (divide by
    RMS), then multiply by weight and add bias (either may be absent)."""

    module: nn.Module
    kind: str
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass(frozen=True)
class Anatomy:
    model_type: str
    embed: nn.Module
    pos_embed: nn.Module | None
    blocks: tuple[Block, ...]
    final_norm: FinalNorm
    unembed: nn.Module  # an nn.Linear-like module: weight [vocab, d_model], optional bias
    n_heads: int
    head_dim: int

    def out_proj_weight(self, block: Block) -> torch.Tensor:
        """The output projection as [d_model, n_heads * head_dim] (GPT-2's Conv1D stores it
        transposed)."""
        weight = block.out_proj.weight
        return weight.t() if type(block.out_proj).__name__ == "Conv1D" else weight

    def out_proj_bias(self, block: Block) -> torch.Tensor | None:
        return getattr(block.out_proj, "bias", None)


def anatomy(model: nn.Module) -> Anatomy:
    """The Anatomy of a supported causal LM; ValueError naming what is missing otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type not in FAMILIES:
        raise ValueError(
            f"no attribution adapter for {name} (model_type {model_type!r}); supported model types: "
            f"{', '.join(sorted(FAMILIES))}. Direct logit attribution needs a causal LM whose residual "
            "stream is its embeddings plus each block's attention and MLP outputs"
        )
    layout = FAMILIES[model_type]
    modules = dict(model.named_modules())
    unembed = next((path for path in layout.unembed if path in modules), layout.unembed[0])
    roles = {"embedding": layout.embed, "final norm": layout.final_norm, "unembedding": unembed,
             "block list": layout.blocks}
    if layout.pos_embed:
        roles["position embedding"] = layout.pos_embed
    missing = [f"{role} {path!r}" for role, path in roles.items() if path not in modules]
    if missing:
        hint = " (load it with its language-model head, e.g. AutoModelForCausalLM)" if unembed not in modules else ""
        raise ValueError(f"{name} (model_type {model_type!r}) has no {', no '.join(missing)}{hint}")
    blocks = []
    for i, block in enumerate(modules[layout.blocks]):
        prefix = f"{layout.blocks}.{i}"
        parts = {}
        for role in ("attn", "out_proj", "mlp"):
            path = f"{prefix}.{getattr(layout, role)}"
            if path not in modules:
                raise ValueError(f"{name}: block {prefix} has no {role} module {path!r}")
            parts[role] = modules[path]
        blocks.append(Block(module=block, **parts))
    n_heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head"))
    d_model = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd"))
    head_dim = int(getattr(config, "head_dim", None) or d_model // n_heads)
    return Anatomy(model_type=model_type, embed=modules[layout.embed],
                   pos_embed=modules[layout.pos_embed] if layout.pos_embed else None, blocks=tuple(blocks),
                   final_norm=_final_norm(modules[layout.final_norm], layout.final_norm),
                   unembed=modules[unembed], n_heads=n_heads, head_dim=head_dim)


def _final_norm(module: nn.Module, path: str) -> FinalNorm:
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if isinstance(module, nn.LayerNorm):
        return FinalNorm(module, "layernorm", float(module.eps), weight, bias)
    if "RMSNorm" in type(module).__name__:
        eps = getattr(module, "variance_epsilon", None)
        eps = getattr(module, "eps", None) if eps is None else eps
        if eps is not None:
            return FinalNorm(module, "rmsnorm", float(eps), weight, bias)
    raise ValueError(f"final norm {path!r} is a {type(module).__name__}: only nn.LayerNorm and "
                     "RMSNorm (weight, variance_epsilon) are understood")
