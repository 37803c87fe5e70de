"""Old import paths that still work: a module that moved leaves behind a shim whose names resolve
on access (module-level __getattr__) to the object at the real path, with a DeprecationWarning
that names that path, so code written against the old one keeps running and learns where to go."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def forwarding(old: str, new: str, names: list[str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for the shim module `old`, whose `names` now live in module `new`."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved: import it from {new} ({old} is a deprecated alias)",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
