"""What a model can take, checked before its forward so that a refusal names the limit instead of
torch's bare "index out of range in self" from deep inside an embedding: the length of a learned
position table, the token type vocabulary, and a batch that holds at least one real token per row.

Which families have a length limit, decided by what the model holds, not by its config alone:
- a learned (or fixed, e.g. Whisper's sinusoidal) position table, an nn.Embedding looked up by
  position (GPT-2 `wpe`, BERT/RoBERTa `position_embeddings`, OPT/BART `embed_positions`): a
  position past its rows cannot be looked up, so the table's usable rows are a hard limit;
- rotary (Llama, Mistral, Qwen, SmolLM, GPT-NeoX), ALiBi (Bloom) and relative buckets (T5): the
  position term is computed for any position. Their config's max_position_embeddings is the length
  they were trained to, not one they cannot run past (quality degrades, nothing fails), so it is
  not enforced: refusing would break long-context use that works today."""

from __future__ import annotations

import weakref

import torch
from torch import nn

# Module names of position tables across Hugging Face families (the last part of the name).
_POSITION_TABLES = ("wpe", "position_embeddings", "embed_positions", "pos_embed", "position_embedding")
_TOKEN_TYPE_TABLES = ("token_type_embeddings",)
# model -> {table names: the embedding found, or None}. Walking every module on each run cost a
# host-bound forward ~10% (365 modules); a model's embeddings do not move between runs.
_found: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _embedding(model: nn.Module, names: tuple[str, ...]) -> nn.Embedding | None:
    """The first nn.Embedding of model whose last name part is one of `names` (remembered)."""
    found = _found.setdefault(model, {})
    if names not in found:
        found[names] = next((module for name, module in model.named_modules()
                             if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in names), None)
    return found[names]


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model's position table can index, or None when it has none.
    RoBERTa-style tables start at padding_idx + 1, OPT's at an `offset` of 2: those rows are not
    usable positions."""
    module = _embedding(model, _POSITION_TABLES)
    if module is None:
        return None
    rows = module.num_embeddings - int(getattr(module, "offset", 0) or 0)
    if module.padding_idx is not None:
        rows -= module.padding_idx + 1
    return rows


def token_type_limit(model: nn.Module) -> int | None:
    """How many token types the model's token type table has (BERT-likes), else None."""
    module = _embedding(model, _TOKEN_TYPE_TABLES)
    return module.num_embeddings if module is not None else None


def check_model_inputs(model: nn.Module, ids: torch.Tensor, kwargs: dict) -> None:
    """ValueError naming the limit for inputs the model cannot take. ids: [batch, tokens] token
    ids (already checked against the vocabulary); kwargs: the forward's other inputs."""
    batch, length = ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(ids.shape)}")
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise ValueError(f"the input is {length} tokens long; {type(model).__name__}'s position table holds "
                         f"{limit} positions (max_position_embeddings): shorten or split the input")
    mask = kwargs.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape == ids.shape:
        empty = (mask == 0).all(dim=1).nonzero().flatten().tolist()
        if empty:
            which = "every sequence" if len(empty) == batch else f"sequence(s) {empty[:5]}"
            raise ValueError(f"{which} of the batch is empty (attention_mask all 0): nothing to trace there")
    types = kwargs.get("token_type_ids")
    if torch.is_tensor(types) and types.numel():
        low, high, kinds = int(types.min()), int(types.max()), token_type_limit(model)
        if low < 0 or (kinds is not None and high >= kinds):
            raise ValueError(f"token_type_ids: type id {low if low < 0 else high} out of range; "
                             f"{type(model).__name__} has {kinds} token types (type_vocab_size)")
