"""Checks of the command line's arguments that need no model: the prompt, the output path and
format, the device, the dtype, the layer pattern (against the module names of the model's config,
built on the meta device: no weights read), the model path. The commands run them before anything
slow (loading a model takes ~20 s), and each failure is one ValueError line."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from recon_fast import model_cache
from recon_fast.atomic_files import check_writable
from recon_fast.cli import options
from recon_fast.cube import export
from recon_fast.models import DEFAULT_MODEL, auto_class, check_model_spec, smollm2_location, torch_dtype
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


def prompts(args) -> list[str]:
    """The command's prompts: --prompt, or --prompt-file's lines (or, with --whole-file, the file)."""
    if args.prompt_file is not None:
        return read_prompts(args.prompt_file, args.whole_file)
    if args.whole_file:
        raise ValueError("--whole-file goes with --prompt-file")
    return [check_prompt(args.prompt)]


def check_layers(spec: str, model: str | None = None) -> None:
    """A preset, or a regex that compiles; with `model`, one that selects at least one of its
    modules (when its config can be read without the weights: else the Tracer checks after loading)."""
    if spec not in presets.PRESETS:
        presets.compile_pattern(spec)
    skeleton = model_skeleton(model) if model is not None else None
    if skeleton is not None:
        try:
            presets.select(skeleton, spec)
        except ValueError as exc:
            raise ValueError(f"--layers: {exc}") from None


def model_skeleton(spec: str | None) -> torch.nn.Module | None:
    """The model of `spec` built from its config on the meta device (module names, no weights,
    well under a second), or None where the config is not at hand without the load: the embedded
    default before its first conversion, a hub id not cached, a config transformers cannot build."""
    import transformers

    try:
        with _quiet_transformers():
            if spec in (None, DEFAULT_MODEL):
                folder = _default_model_cache()
                if folder is None:
                    return None
                # a causal LM, as load_model builds it (the converted config names no architecture)
                config, gguf = transformers.AutoConfig.from_pretrained(str(folder)), True
            elif spec.endswith(".gguf") and Path(spec).is_file():
                path = Path(spec)
                config, gguf = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name), True
            else:
                config, gguf = transformers.AutoConfig.from_pretrained(spec, local_files_only=True), False
            cls = auto_class(config, gguf)
            with torch.device("meta"):
                return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    except Exception:  # noqa: BLE001 (any failure here only means: check after the load instead)
        return None


def _default_model_cache() -> Path | None:
    """The embedded SmolLM2's converted folder if it is already in the cache (never built here)."""
    folder, gguf = smollm2_location()
    root = model_cache.cache_root()
    if not root.is_dir():
        return None
    sha256 = model_cache.source_sha256(folder / gguf, root)
    entry = root / model_cache.entry_name("smollm2", sha256)
    return entry if model_cache.is_complete(entry, sha256) else None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings about a config (e.g. a GGUF's) are the load's to print, not ours."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def check_output(path: str, format: str | None = None) -> str:
    """The cube format of `path` (from its suffix), and that it can be written."""
    check_writable(path)
    return export.cube_format(path, format)


def check_model(args) -> None:
    """--model, --device, --device-map and --dtype, common to every command, and its counts."""
    options.check_counts(args)
    check_device(args.device)
    if getattr(args, "device_map", None) is not None:
        if args.device is not None:
            raise ValueError("give --device or --device-map, not both (a device map places every module itself)")
        options.device_map(args.device_map)
    check_dtype(args.dtype)
    check_model_spec(args.model)
