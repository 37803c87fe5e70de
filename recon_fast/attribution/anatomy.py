"""Where a causal language model keeps the parts that write into its residual stream: embeddings,
each block's attention (its output projection, for per-head terms) and MLP (its down projection,
for per-neuron terms), norms that sit between a component and the residual stream, multipliers
on what is written, the final norm, the unembedding and what is done to the logits after it. One
small adapter per architecture family says where; the attribution math in
recon_fast.attribution.decomposition is written once against this description."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from recon_fast.dispatch import weight as real_weight


@dataclass(frozen=True)
class FamilyLayout:
    """Module paths of one architecture family, relative to the causal-LM model (block parts
    relative to a block)."""

    blocks: str
    attn: str  # its output is the attention's write (before any post-norm)
    out_proj: str  # its input holds every head's output side by side
    mlp: str
    down_proj: str  # its input holds the MLP's hidden neurons
    final_norm: str
    unembed: tuple[str, ...] = ("lm_head",)  # first one present wins (names changed across versions)
    embed: str | None = None  # None: the embedding is what enters block 0 (scales and multipliers included)
    pos_embed: str | None = None  # with `embed`: a learned position embedding, a term of its own
    attn_post_norm: str | None = None  # a norm between the attention and the residual stream (Gemma2, OLMo2)
    mlp_post_norm: str | None = None
    norm_offset: float = 0.0  # Gemma's RMSNorms multiply by (1 + weight)
    residual_multiplier: str | None = None  # config field scaling every block's writes (Granite)


_GPT2 = FamilyLayout(embed="transformer.wte", pos_embed="transformer.wpe", blocks="transformer.h", attn="attn",
                     out_proj="attn.c_proj", mlp="mlp", down_proj="mlp.c_proj", final_norm="transformer.ln_f")
_LLAMA = FamilyLayout(blocks="model.layers", attn="self_attn", out_proj="self_attn.o_proj", mlp="mlp",
                      down_proj="mlp.down_proj", final_norm="model.norm")
_NEOX = FamilyLayout(blocks="gpt_neox.layers", attn="attention", out_proj="attention.dense", mlp="mlp",
                     down_proj="mlp.dense_4h_to_h", final_norm="gpt_neox.final_layer_norm",
                     unembed=("lm_head", "embed_out"))
_GEMMA = replace(_LLAMA, norm_offset=1.0)  # the sqrt(d) embedding scale is in what enters block 0
_GEMMA2 = replace(_GEMMA, attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm")
_OLMO2 = replace(_LLAMA, attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm")
_PHI = replace(_LLAMA, out_proj="self_attn.dense", down_proj="mlp.fc2", final_norm="model.final_layernorm")
_FALCON = FamilyLayout(blocks="transformer.h", attn="self_attention", out_proj="self_attention.dense", mlp="mlp",
                       down_proj="mlp.dense_4h_to_h", final_norm="transformer.ln_f")

# model_type -> layout. A family belongs here when its residual stream is exactly the embeddings
# plus each block's attention and MLP writes, each possibly through a norm of its own and times
# a constant; the reconstruction check in direct.py refuses a layout that misses a term.
FAMILIES: dict[str, FamilyLayout] = {
    "gpt2": _GPT2,
    "llama": _LLAMA,  # SmolLM2 too
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _LLAMA,  # fused qkv and gate_up: the output and down projections are Llama's
    "cohere": _LLAMA,  # parallel attention and MLP; logit_scale applied to the logits
    "granite": replace(_LLAMA, residual_multiplier="residual_multiplier"),  # and logits / logits_scaling
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,  # and final logit soft-capping: the pre-cap logit is attributed
    "gemma3_text": _GEMMA2,
    "olmo2": _OLMO2,
    "phi": _PHI,  # parallel attention and MLP, LayerNorm with bias, unembedding bias
    "falcon": _FALCON,
    "gpt_neox": _NEOX,
}


@dataclass(frozen=True)
class Norm:
    """A normalisation: kind "layernorm" (centre, divide by std) or "rmsnorm" (divide by RMS),
    then multiply by `weight` (the effective one: Gemma's 1 + w) and add `bias` (either may be
    None). Attribution freezes its scale at the actual input, which makes it linear."""

    module: nn.Module
    kind: str
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [...]: what the norm divides its input x by."""
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    def pull_back(self, direction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The direction in the norm's input space that reads, from a part v of the input x, the
        part's share of (norm(x) - bias) . direction: [..., d] float64 -> [..., d]."""
        if self.weight is not None:
            direction = direction * self.weight.to(direction.device, torch.float64)
        if self.kind == "layernorm":  # centring every part = centring the direction, for a dot product
            direction = direction - direction.mean(-1, keepdim=True)
        return direction / self.scale(x).unsqueeze(-1)


# FinalNorm is what earlier versions called the final norm's description.
FinalNorm = Norm


@dataclass(frozen=True)
class Block:
    module: nn.Module
    attn: nn.Module
    out_proj: nn.Module
    mlp: nn.Module
    down_proj: nn.Module
    attn_post_norm: Norm | None = None
    mlp_post_norm: Norm | None = None


@dataclass(frozen=True)
class Anatomy:
    model_type: str
    embed: nn.Module | None  # None: the embedding term is the input of block 0
    pos_embed: nn.Module | None
    blocks: tuple[Block, ...]
    final_norm: Norm
    unembed: nn.Module  # an nn.Linear-like module: weight [vocab, d_model], optional bias
    n_heads: int
    head_dim: int
    residual_multiplier: float = 1.0  # every block's writes are multiplied by it (Granite)
    logit_multiplier: float = 1.0  # the unembedding's output times this is the logit (Granite, Cohere)
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) after that (Gemma2/3)

    def out_proj_weight(self, block: Block) -> torch.Tensor:
        """The output projection as [d_model, n_heads * head_dim]."""
        return _linear_weight(block.out_proj)

    def out_proj_bias(self, block: Block) -> torch.Tensor | None:
        return real_weight(block.out_proj, "bias")

    def down_proj_weight(self, block: Block) -> torch.Tensor:
        """The MLP's down projection as [d_model, d_mlp]."""
        return _linear_weight(block.down_proj)

    def down_proj_bias(self, block: Block) -> torch.Tensor | None:
        return real_weight(block.down_proj, "bias")


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """[out, in] whether nn.Linear or GPT-2's Conv1D (which stores it transposed); read in
    through accelerate's hook where the module is offloaded."""
    weight = real_weight(module)
    return weight.t() if type(module).__name__ == "Conv1D" else weight


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
    roles = {"final norm": layout.final_norm, "unembedding": unembed, "block list": layout.blocks}
    if layout.embed:
        roles["embedding"] = layout.embed
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
        for role in ("attn", "out_proj", "mlp", "down_proj", "attn_post_norm", "mlp_post_norm"):
            relative = getattr(layout, role)
            if relative is None:
                continue
            path = f"{prefix}.{relative}"
            if path not in modules:
                raise ValueError(f"{name}: block {prefix} has no {role} module {path!r}")
            parts[role] = modules[path]
            if role.endswith("post_norm"):
                parts[role] = norm(modules[path], path, layout.norm_offset)
        blocks.append(Block(module=block, **parts))
    n_heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head"))
    d_model = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd"))
    head_dim = int(getattr(config, "head_dim", None) or d_model // n_heads)
    return Anatomy(model_type=model_type, embed=modules[layout.embed] if layout.embed else None,
                   pos_embed=modules[layout.pos_embed] if layout.pos_embed else None, blocks=tuple(blocks),
                   final_norm=norm(modules[layout.final_norm], layout.final_norm, layout.norm_offset),
                   unembed=modules[unembed], n_heads=n_heads, head_dim=head_dim,
                   residual_multiplier=float(getattr(config, layout.residual_multiplier))
                   if layout.residual_multiplier else 1.0,
                   **logit_processing(config))


def logit_processing(config) -> dict:
    """What a family does to the unembedding's output, read from its config: Granite divides by
    logits_scaling, Cohere multiplies by logit_scale, Gemma2/3 soft-cap (cap * tanh(x / cap))."""
    model_type = getattr(config, "model_type", None)
    multiplier = 1.0
    if model_type in ("granite", "granitemoe") and getattr(config, "logits_scaling", None):
        multiplier = 1.0 / float(config.logits_scaling)
    if model_type in ("cohere", "cohere2") and getattr(config, "logit_scale", None):
        multiplier = float(config.logit_scale)
    cap = getattr(config, "final_logit_softcapping", None)
    return {"logit_multiplier": multiplier, "logit_softcap": float(cap) if cap else None}


def norm(module: nn.Module, path: str, offset: float = 0.0) -> Norm:
    """The Norm description of a LayerNorm or RMSNorm module; ValueError for anything else."""
    weight = real_weight(module)  # a copy read in where the norm is offloaded (meta otherwise)
    if weight is not None and offset:
        weight = weight.detach().double() + offset
    bias = real_weight(module, "bias")
    if isinstance(module, nn.LayerNorm):
        return Norm(module, "layernorm", float(module.eps), weight, bias)
    kind = ("rmsnorm" if "RMSNorm" in type(module).__name__
            else "layernorm" if "LayerNorm" in type(module).__name__ else None)  # CohereLayerNorm
    eps = getattr(module, "variance_epsilon", None)
    eps = getattr(module, "eps", None) if eps is None else eps
    if kind is not None and eps is not None:
        return Norm(module, kind, float(eps), weight, bias)
    raise ValueError(f"norm {path!r} is a {type(module).__name__}: only nn.LayerNorm, *LayerNorm and "
                     "*RMSNorm (weight, eps or variance_epsilon) are understood")


# ---- the logit lens needs less: the blocks, the final norm and the unembedding ---------------------
@dataclass(frozen=True)
class LensParts:
    blocks: tuple[nn.Module, ...]
    final_norm: nn.Module
    unembed: nn.Module
    logit_multiplier: float = 1.0
    logit_softcap: float | None = None


# (block list, final norm) pairs that causal LMs use; the first pair present in a model wins.
LENS_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("model.layers", "model.norm"),  # Llama, Mistral, Qwen, Gemma, Granite, OLMo, Cohere, Phi3
    ("model.layers", "model.final_layernorm"),  # Phi
    ("transformer.h", "transformer.ln_f"),  # GPT-2, GPT-J, Bloom, Falcon, CodeGen
    ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    ("model.decoder.layers", "model.decoder.final_layer_norm"),  # OPT
    ("transformer.blocks", "transformer.norm_f"),  # MPT
    ("model.language_model.layers", "model.language_model.norm"),  # multimodal wrappers (Gemma3, ...)
)


def lens_parts(model: nn.Module) -> LensParts:
    """The parts the logit lens needs, for any causal LM laid out as one of LENS_LAYOUTS with an
    output embedding; ValueError naming what is missing otherwise."""
    config = getattr(model, "config", None)
    modules = dict(model.named_modules())
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layout = next(((blocks, final) for blocks, final in LENS_LAYOUTS if blocks in modules and final in modules), None)
    if unembed is None or getattr(unembed, "weight", None) is None or layout is None:
        what = " and ".join(w for w, absent in (("an unembedding (get_output_embeddings())", unembed is None or getattr(unembed, "weight", None) is None),
                                                ("a block list and final norm", layout is None)) if absent)
        raise ValueError(f"the logit lens needs a final norm and an unembedding: {type(model).__name__} "
                         f"(model_type {getattr(config, 'model_type', None)!r}) lacks {what}; known layouts "
                         f"(blocks, final norm): {', '.join(f'{b} + {f}' for b, f in LENS_LAYOUTS)}")
    blocks = tuple(modules[layout[0]])
    return LensParts(blocks=blocks, final_norm=modules[layout[1]], unembed=unembed, **logit_processing(config))
