"""Which modules to hook: name lookup with suggestions, the original tool's default, and named
presets that find the same places (block outputs, attention and MLP outputs) across GPT-2, Llama,
GPT-NeoX, BERT and similar Hugging Face architectures."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable

from torch import nn

# Child names under which architectures keep a block's attention and MLP, most common first.
ATTENTION_CHILDREN = ("self_attn", "attn", "attention", "self_attention")
MLP_CHILDREN = ("mlp", "feed_forward", "ffn", "intermediate")

PRESETS = {
    "all": "every non-root module with trainable parameters (the original tool's default)",
    "residual": "the residual stream after each transformer block (each block's output)",
    "attn": "each block's attention output",
    "mlp": "each block's MLP output",
    "components": "each block's attention and MLP outputs, in block order",
    "blocks+components": "each block's attention output, MLP output and block output",
}


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`; KeyError naming the closest names when there is none."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise KeyError(f"module {name!r} not found in {type(model).__name__}{hint}")


def default_filter(name: str, module: nn.Module) -> bool:
    """The original ReconTracer.add_hooks_all rule: any trainable parameter, own or nested."""
    return any(p.requires_grad for p in module.parameters())


def select_all(model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None) -> list[str]:
    """Non-root module names in named_modules() order that pass filter_fn (default_filter)."""
    keep = filter_fn or default_filter
    return [name for name, module in model.named_modules() if name and keep(name, module)]


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks: the longest nn.ModuleList whose children share a class."""
    best: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) == 1 and len(module) > len(best):
            best = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    if not best:
        raise ValueError(
            f"no transformer blocks found in {type(model).__name__}: no nn.ModuleList of "
            "identical layers; hook modules by name or regex instead"
        )
    return best


def _child(model: nn.Module, block: str, candidates: Iterable[str], role: str) -> str:
    block_module = resolve_module(model, block)
    children = dict(block_module.named_children())
    for candidate in candidates:
        if candidate in children:
            return f"{block}.{candidate}"
    raise ValueError(
        f"block {block!r} ({type(block_module).__name__}) has no {role} submodule among "
        f"{list(candidates)}; its children are {list(children)}"
    )


def select_preset(model: nn.Module, preset: str) -> list[str]:
    """Module names for a named preset (see PRESETS)."""
    if preset == "all":
        return select_all(model)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    names = []
    for block in find_blocks(model):
        if preset in ("attn", "components", "blocks+components"):
            names.append(_child(model, block, ATTENTION_CHILDREN, "attention"))
        if preset in ("mlp", "components", "blocks+components"):
            names.append(_child(model, block, MLP_CHILDREN, "MLP"))
        if preset in ("residual", "blocks+components"):
            names.append(block)
    return names


def compile_pattern(pattern: str) -> re.Pattern:
    """A module-name regex, or ValueError naming what is wrong with it."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad module pattern {pattern!r}: {exc}") from None


def select_regex(model: nn.Module, pattern: str) -> list[str]:
    """Module names matching `pattern` in full (re.fullmatch), in named_modules() order."""
    compiled = compile_pattern(pattern)
    names = [name for name, _ in model.named_modules() if name and compiled.fullmatch(name)]
    if not names:
        raise ValueError(f"no module name matches '{pattern}' (a pattern must match a whole name, "
                         "e.g. 'model\\.layers\\.\\d+')")
    return names


def select(model: nn.Module, spec: str) -> list[str]:
    """A preset name, else a regular expression over module names."""
    return select_preset(model, spec) if spec in PRESETS else select_regex(model, spec)
