"""Models dispatched by accelerate (from_pretrained(device_map=...), dispatch_model, cpu_offload,
disk_offload): layers on several devices, modules offloaded to the CPU or disk whose weights are
meta tensors except while accelerate's hooks move them in for a call. Where a module runs, its
weights as they are at call time, and the one-line split a command prints."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device | None:
    """Where `module` computes: its accelerate hook's execution device when it has one (an
    offloaded module's parameters are on "meta"), else the device of its first real parameter."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:  # a SequentialHook: the first hook that names one
        device = next((h.execution_device for h in getattr(hook, "hooks", ())
                       if getattr(h, "execution_device", None) is not None), None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    first = next((p for p in module.parameters() if p.device.type != "meta"), None)
    return first.device if first is not None else None


def input_device(model: nn.Module) -> torch.device:
    """Where a dispatched model's inputs go when its first parameter is offloaded (meta): where
    the first module that computes runs (the embedding, in practice)."""
    for module in model.modules():
        device = execution_device(module) if hasattr(module, "_hf_hook") else None
        if device is not None:
            return device
    return torch.device("cpu")


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """The module with its own parameters real (moved in by its accelerate hook, as for a call)
    for the duration; a no-op for a module that is not offloaded. Attribution reads weights
    (unembedding rows, output projections) outside any forward pass, where they would be meta."""
    hook = getattr(module, "_hf_hook", None)
    offloaded = any(p.device.type == "meta" for p in module.parameters(recurse=False))
    if hook is None or not offloaded:
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def weight(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """module.<name> as a real tensor (for an offloaded module, a copy read in through its hook)."""
    tensor = getattr(module, name, None)
    if tensor is None or tensor.device.type != "meta":
        return tensor
    with onloaded(module):
        real = getattr(module, name)
        if real.device.type == "meta":
            raise RuntimeError(f"{type(module).__name__}.{name} is offloaded and its accelerate hook did not move "
                               "it in (weights of a parent's hook, preload_module_classes?)")
        return real.detach().clone()


def device_split(model: nn.Module) -> str:
    """One line saying which layers are on which device, from the model's hf_device_map (e.g.
    "embed_tokens on cuda:0, layers 0-14 on cuda:0, 15-29 on cpu, norm, lm_head on disk"), or
    "all on <device>" for a model on one device."""
    placement = getattr(model, "hf_device_map", None)
    if not placement:
        devices = list(dict.fromkeys(str(p.device) for p in model.parameters())) or ["cpu"]
        return f"all on {devices[0]}" if len(devices) == 1 else f"parameters on {', '.join(devices)}"
    if len(set(map(str, placement.values()))) == 1:
        return f"all on {_device_name(next(iter(placement.values())))}"
    groups: list[tuple[str, list[str]]] = []  # (device, labels) in model order
    run: list[int] = []  # indices of the layers in the current group's last label
    word = "layers "  # said once, before the first range
    for name, device in placement.items():
        device = _device_name(device)
        match = re.search(r"\.(\d+)$", name)
        index = int(match.group(1)) if match else None
        if index is not None and run and groups[-1][0] == device and index == run[-1] + 1:
            run.append(index)  # the run goes on: widen its range
            head = "layers " if groups[-1][1][-1].startswith("layers ") else ""
            groups[-1][1][-1] = f"{head}{run[0]}-{index}"
            continue
        if index is not None:
            run, label, word = [index], f"{word}{index}", ""
        else:
            run, label = [], name.rsplit(".", 1)[-1] or "model"
        if groups and groups[-1][0] == device:
            groups[-1][1].append(label)
        else:
            groups.append((device, [label]))
    line = ", ".join(f"{', '.join(what)} on {device}" for device, what in groups)
    main = _main_device(placement)
    if main != "cpu" and any(_device_name(d) in ("cpu", "disk") for d in placement.values()):
        line += f" (offloaded modules run on {main})"
    return line


def _device_name(device) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(device)


def _main_device(placement: dict) -> str:
    """accelerate's main device: the first that is neither the CPU nor disk (offloaded modules
    compute there), else the CPU."""
    names = [_device_name(d) for d in placement.values()]
    return next((n for n in names if n not in ("cpu", "disk")), "cpu")
