"""Checks of the command line's arguments that need no model: the prompt, the output path and
format, the device, the dtype, the layer pattern, the model path. The commands run them before
anything slow (loading a model takes ~20 s), and each failure is one ValueError line."""

from __future__ import annotations

from pathlib import Path

import torch

from recon_fast.cube import export
from recon_fast.models import check_model_spec, torch_dtype
from recon_fast.trace import presets


def check_prompt(prompt: str, where: str = "--prompt") -> str:
    if not prompt or not prompt.strip():
        raise ValueError(f"the prompt is empty ({where}): give some text to trace")
    return prompt


def read_prompts(path: str, whole_file: bool) -> list[str]:
    """--prompt-file: one prompt per non-blank line, or the whole file as one prompt."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"cannot read the prompt file {path!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the prompt file {path!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if whole_file:
        prompts = [text.strip("\n")] if text.strip() else []
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"the prompt file {path!r} has no prompt (it is empty or blank)")
    return prompts


def check_device(name: str | None) -> None:
    """A device torch can use here: parsed, and present (CUDA built in and a GPU of that index)."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) is built without CUDA; use --device cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is built in but no GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"--device {name}: {device.type} is not available here")


def check_dtype(name: str | None) -> None:
    if name is not None:
        torch_dtype(name)


def check_layers(spec: str) -> None:
    if spec not in presets.PRESETS:
        presets.compile_pattern(spec)


def check_output(path: str, format: str | None = None) -> str:
    """The cube format of `path` (from its suffix), and that it can be written."""
    export.check_writable(path)
    return export.cube_format(path, format)


def check_model(args) -> None:
    """--model, --device and --dtype, common to every command."""
    check_device(args.device)
    check_dtype(args.dtype)
    check_model_spec(args.model)
