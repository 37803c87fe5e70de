"""Turning what a user hands us (text, token ids, a BatchEncoding) into the keyword arguments of a
model's forward, on the model's device: shared by the Tracer and the attribution tools."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: model.device when it has one, else its first parameter's."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def forward_takes(model: nn.Module, name: str) -> bool:
    """Whether model.forward names the parameter `name` (not merely accepts **kwargs)."""
    return name in inspect.signature(model.forward).parameters


def model_dtype(model: nn.Module) -> torch.dtype | None:
    first = next(model.parameters(), None)
    return first.dtype if first is not None else None


def token_texts(tokenizer, rows: list[list[int]]) -> list[list[str]]:
    """Each token id decoded on its own, per sequence; the ids as text without a tokenizer."""
    if tokenizer is None:
        return [[str(t) for t in row] for row in rows]
    return [tokenizer.batch_decode([[t] for t in row]) for row in rows]


def _is_text(value) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(s, str) for s in value))


def prepare_inputs(model: nn.Module, tokenizer, input_ids, kwargs: dict, *, caller: str = "run()") -> dict:
    """Model keyword arguments with input_ids as [batch, tokens] (a 1-D input becomes one row),
    every tensor on the model's device. input_ids: token ids, a dict/BatchEncoding of model
    inputs, or text (a string or a list of strings, padded) when a tokenizer is given."""
    if _is_text(input_ids):
        if tokenizer is None:
            raise ValueError(f"text input to {caller} needs a tokenizer")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        input_ids = tokenizer(input_ids, return_tensors="pt", padding=True)
    if input_ids is None:
        input_ids = kwargs.pop("input_ids", None)
    if isinstance(input_ids, dict) or hasattr(input_ids, "data") and isinstance(getattr(input_ids, "data"), dict):
        inputs = {**dict(input_ids), **kwargs}
    elif torch.is_tensor(input_ids):
        inputs = {"input_ids": input_ids, **kwargs}
    else:
        raise TypeError(f"{caller} takes token ids, a dict of model inputs or text; got {type(input_ids).__name__}")
    ids = inputs.get("input_ids")
    if not torch.is_tensor(ids):
        raise ValueError("model inputs have no input_ids tensor")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integer token ids, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        if torch.is_tensor(inputs.get("attention_mask")) and inputs["attention_mask"].dim() == 1:
            inputs["attention_mask"] = inputs["attention_mask"].unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(ids.shape)}")
    device = model_device(model)
    inputs["input_ids"] = ids
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
