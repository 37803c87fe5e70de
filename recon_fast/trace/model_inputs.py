"""Turning what a user hands us (text, token ids, a BatchEncoding, or any tensors a forward takes)
into the inputs of a model's forward, on the model's device, with token ids checked against the
vocabulary before the forward: shared by the Tracer and the attribution tools."""

from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from recon_fast.trace.input_limits import check_model_inputs


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: model.device when it has one, else its first parameter's."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "meta":  # offloaded by accelerate: where it runs
        from recon_fast.dispatch import input_device

        return input_device(model)
    return first.device if first is not None else torch.device("cpu")


def model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """(model_device(model), model_dtype(model)), with one walk to the first parameter where the
    model's `device` is that parameter's (Hugging Face's property, or no `device` at all): each
    walk cost a traced run of the host-bound proxy ~25 us, caches cold after the forward."""
    first = next(model.parameters(), None)
    if first is not None and first.device.type != "meta" and _device_is_first_parameters(model):
        return first.device, first.dtype
    return model_device(model), (first.dtype if first is not None else None)


# model class -> whether its `device` is its first parameter's: Hugging Face's property, or none at
# all (no class attribute and nn.Module's own __getattr__, which never makes one up). Weakly: some
# classes are made per instance (torch.fx.GraphModule).
_DEVICE_IS_FIRST_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _device_is_first_parameters(model: nn.Module) -> bool:
    cls = type(model)
    known = _DEVICE_IS_FIRST_PARAMETERS.get(cls)
    if known is None:
        attribute = getattr(cls, "device", None)
        transformers_models = sys.modules.get("transformers.modeling_utils")
        hf_device = getattr(getattr(transformers_models, "PreTrainedModel", None), "device", None)
        if attribute is None:
            known = getattr(cls, "__getattr__", None) is nn.Module.__getattr__
        else:
            known = hf_device is not None and attribute is hf_device
        _DEVICE_IS_FIRST_PARAMETERS[cls] = known
    return known and "device" not in model.__dict__


def forward_takes(module: nn.Module, *names: str, or_kwargs: bool = False) -> bool:
    """Whether module.forward names every parameter in `names`; with or_kwargs, also when it
    takes **kwargs (which a plain call can pass them through)."""
    params = inspect.signature(module.forward).parameters
    if or_kwargs and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(n in params for n in names)


def model_dtype(model: nn.Module) -> torch.dtype | None:
    first = next(model.parameters(), None)
    return first.dtype if first is not None else None


# The ids last shown as text without a tokenizer, and their texts: a Tracer run again on the same
# ids (a loop over one prompt, a benchmark) reuses them; str() of 128 ids cost a compiled 4-layer
# run ~50 us with the caches a forward leaves. A tokenizer decodes every time: its decoding can
# change between runs (its decoder, its settings) in ways no cheap check sees.
_LAST_TEXTS: list = [None, None]


def token_texts(tokenizer, rows: list[list[int]]) -> list[list[str]]:
    """Each token id decoded on its own, per sequence; the ids as text without a tokenizer."""
    if tokenizer is not None:
        return [tokenizer.batch_decode([[t] for t in row]) for row in rows]
    last_rows, last_texts = _LAST_TEXTS
    if last_rows == rows:
        return [list(texts) for texts in last_texts]
    texts = [[str(t) for t in row] for row in rows]
    _LAST_TEXTS[:] = [[list(row) for row in rows], [list(t) for t in texts]]
    return texts


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (or config.vocab_size); None when it has neither."""
    rows = getattr(input_embedding(model), "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


# model -> (its input embedding, weakly, and the names of the children that lead to it). Hugging
# Face's get_input_embeddings tries attribute after attribute (~20 us a run, caches cold after a
# forward); the chain is walked instead, and asked again when another module sits at its end
# (set_input_embeddings, resize_token_embeddings).
_INPUT_EMBEDDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def input_embedding(model: nn.Module) -> nn.Module | None:
    """model.get_input_embeddings(), or None where it has none."""
    found = _INPUT_EMBEDDINGS.get(model)
    if found is not None and "get_input_embeddings" not in model.__dict__:  # not a method of the instance's own
        embedding, path = found
        module = model
        for name in path:
            module = module._modules.get(name)
            if module is None:
                break
        if module is not None and module is embedding():
            return module
    get = getattr(model, "get_input_embeddings", None)
    try:
        module = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        module = None
    if isinstance(module, nn.Module):
        path = next((name for name, child in model.named_modules() if child is module), None)
        if path is not None:
            _INPUT_EMBEDDINGS[model] = (weakref.ref(module), tuple(path.split(".")) if path else ())
    return module


def check_token_ids(model: nn.Module, ids: torch.Tensor, name: str = "input_ids") -> None:
    """Token ids the embedding can look up, checked before the forward (torch's own error is a
    bare "index out of range in self" from deep inside it)."""
    if ids.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # one sync where ids are on a GPU
    if low < 0:
        raise ValueError(f"{name} holds a negative token id ({low})")
    vocab = vocabulary_size(model)
    if vocab is not None and high >= vocab:
        raise ValueError(f"{name}: token id {high} >= vocabulary size {vocab} of {type(model).__name__}")


def _is_text(value) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(s, str) for s in value))


def _is_mapping(value) -> bool:
    return isinstance(value, dict) or isinstance(getattr(value, "data", None), dict)


# forward's function -> its first positional parameter's name. inspect.signature costs ~25 us
# (~90 us inside a traced run, caches cold), and the Tracer asks on every run.
_FIRST_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _first_parameter(model: nn.Module) -> str | None:
    forward = model.forward
    # A bound method is made anew at each attribute access: its function is the key (an instance's
    # own forward, as accelerate's hooks install, is its own key).
    key = getattr(forward, "__func__", forward)
    try:
        return _FIRST_PARAMETERS[key]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: asked every time
        return _first_positional(forward)
    name = _FIRST_PARAMETERS[key] = _first_positional(forward)
    return name


def _first_positional(forward) -> str | None:
    params = [p for p in inspect.signature(forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[0].name if params else None


@dataclass
class ModelCall:
    """How to call a model's forward, and what its token axes are.

    ids:         [batch, tokens] token ids when the input is token ids, else None (then the token
                 axis of each activation is its second-to-last dim, and tokens are positions).
    decoder_ids: an encoder-decoder's [batch, decoder tokens] ids, when given.
    batch:       the batch size (dim 0 of the first input tensor).
    device:      where the inputs went: the model's device (model_device), worked out once per call.
    dtype:       the model's dtype (model_dtype), worked out with the device."""

    args: tuple
    kwargs: dict
    ids: torch.Tensor | None
    decoder_ids: torch.Tensor | None
    batch: int
    device: torch.device
    dtype: torch.dtype | None = None

    def __call__(self, model: nn.Module):
        return model(*self.args, **self.kwargs)


def prepare_call(model: nn.Module, tokenizer, inputs: tuple, kwargs: dict, *, caller: str = "run()") -> ModelCall:
    """The positional and keyword inputs of model.forward, every tensor on the model's device.
    inputs: text (with a tokenizer), token ids ([T] or [B, T]), a dict/BatchEncoding of keyword
    inputs, or whatever positional tensors the forward takes (images, feature sequences ...)."""
    inputs = tuple(inputs)
    if len(inputs) == 1 and _is_text(inputs[0]):
        if tokenizer is None:
            raise ValueError(f"text input to {caller} needs a tokenizer")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        inputs = (tokenizer(inputs[0], return_tensors="pt", padding=True),)
    kwargs = dict(kwargs)
    if len(inputs) == 1 and _is_mapping(inputs[0]):
        kwargs = {**dict(inputs[0]), **kwargs}
        inputs = ()
    tensors = [v for v in (*inputs, *kwargs.values()) if torch.is_tensor(v)]
    if not tensors:
        shown = repr(inputs[0])[:40] if inputs else "no inputs"
        kind = type(inputs[0]).__name__ if inputs else "nothing"
        raise TypeError(f"{caller} takes token ids, text (with a tokenizer), a dict of model inputs or the tensors "
                        f"the model's forward takes; got {shown} ({kind})")
    first = _first_parameter(model)
    ids = kwargs.get("input_ids")
    if inputs and torch.is_tensor(inputs[0]):
        head = inputs[0]
        if first == "input_ids" or (not head.is_floating_point() and not head.is_complex()):
            ids = head
            inputs = inputs[1:]
            if first == "input_ids":  # by name, so that keyword inputs keep their meaning
                kwargs["input_ids"] = ids
            else:
                inputs = (ids, *inputs)
    if ids is not None:
        ids = _token_ids(model, ids, kwargs, caller)
        if "input_ids" in kwargs:
            kwargs["input_ids"] = ids
        else:
            inputs = (ids, *inputs[1:])
    decoder_ids = kwargs.get("decoder_input_ids")
    if torch.is_tensor(decoder_ids):
        check_token_ids(model, decoder_ids, "decoder_input_ids")
    else:
        decoder_ids = None
    batch_of = ids if ids is not None else tensors[0]
    batch = batch_of.shape[0] if batch_of.dim() > 0 else 1
    device, dtype = model_placement(model)
    move = lambda v: v.to(device) if torch.is_tensor(v) else v  # noqa: E731
    return ModelCall(args=tuple(move(v) for v in inputs), kwargs={k: move(v) for k, v in kwargs.items()},
                     ids=None if ids is None else ids.to(device),
                     decoder_ids=None if decoder_ids is None else decoder_ids.to(device), batch=batch,
                     device=device, dtype=dtype)


def _token_ids(model: nn.Module, ids, kwargs: dict, caller: str) -> torch.Tensor:
    """input_ids as [batch, tokens] integer ids in the vocabulary (a 1-D input becomes one row)."""
    if not torch.is_tensor(ids):
        raise ValueError("model inputs have no input_ids tensor")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"input_ids must be integer token ids, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        if torch.is_tensor(kwargs.get("attention_mask")) and kwargs["attention_mask"].dim() == 1:
            kwargs["attention_mask"] = kwargs["attention_mask"].unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(ids.shape)}")
    check_token_ids(model, ids)
    check_model_inputs(model, ids, kwargs)  # position table, token types, empty rows
    return ids


def prepare_inputs(model: nn.Module, tokenizer, input_ids, kwargs: dict, *, caller: str = "run()") -> dict:
    """Model keyword arguments with input_ids as [batch, tokens] (a 1-D input becomes one row),
    every tensor on the model's device. input_ids: token ids, a dict/BatchEncoding of model
    inputs, or text (a string or a list of strings, padded) when a tokenizer is given."""
    if input_ids is None:
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("model inputs have no input_ids tensor")
    if not (torch.is_tensor(input_ids) or _is_text(input_ids) or _is_mapping(input_ids)):
        raise TypeError(f"{caller} takes token ids, a dict of model inputs or text; got {type(input_ids).__name__}")
    if torch.is_tensor(input_ids) and (input_ids.is_floating_point() or input_ids.dtype == torch.bool):
        raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    call = prepare_call(model, tokenizer, (input_ids,), kwargs, caller=caller)
    if call.ids is None:
        raise ValueError("model inputs have no input_ids tensor")
    if call.args:
        raise TypeError(f"{caller} needs a model whose forward takes input_ids")
    return call.kwargs
