"""The recon_fast package of another checkout (say `git archive` of an earlier commit, unpacked),
imported beside the one under test, so that a benchmark can time both in the same rounds: a
before/after figure measured side by side instead of in two runs on a machine whose load drifts.

Both use this checkout's compiled library (recon_fast._C, loaded once per process), so the other
checkout must need nothing from it that this one's lacks (a library only ever gains functions);
the other's fake (meta) registrations of the ops are skipped, as they are registered once. While
the other checkout's modules import, they are `recon_fast.*` in sys.modules; afterwards this
checkout's modules are put back, and the other's live on in what was imported from them.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch


def import_checkout(root: str | os.PathLike, module: str = "recon_fast") -> ModuleType:
    """`module` (a module of the recon_fast package) as the checkout at `root` has it."""
    import recon_fast.kernels.token_stats  # noqa: F401  (this checkout's library, loaded first)

    ours = {name: mod for name, mod in sys.modules.items() if name == "recon_fast" or name.startswith("recon_fast.")}
    library = sys.modules["recon_fast._C"]
    for name in ours:
        del sys.modules[name]
    sys.modules["recon_fast._C"] = library
    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
    sys.path.insert(0, os.fspath(root))
    try:
        imported = importlib.import_module(module)
        if not os.fspath(imported.__file__).startswith(os.path.abspath(root)):
            raise ImportError(f"{module} came from {imported.__file__}, not from {root}")
        return imported
    finally:
        sys.path.remove(os.fspath(root))
        torch.library.register_fake = register_fake
        for name in [n for n in sys.modules if n == "recon_fast" or n.startswith("recon_fast.")]:
            del sys.modules[name]
        sys.modules.update(ours)
