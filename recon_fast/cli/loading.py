"""The model load of every command: one line `model NAME loaded in N s, M s since start` on
stderr (N: the load itself; M: from the command's start, so the imports and checks before the load
are not hidden), with a second line naming the split when --device-map is given, and the
libraries' own progress bars (transformers' weights bar, its GGUF de-quantising bar, which is a
bare tqdm and ignores transformers' switch) off unless --verbose, so that pipes and logs get no
carriage returns."""

from __future__ import annotations

import contextlib
import sys
import time

from recon_fast.cli import options
from recon_fast.dispatch import device_split
from recon_fast.models import load_model


@contextlib.contextmanager
def progress_bars_off():
    """Every tqdm bar created inside is disabled (tqdm.auto and transformers' bars subclass
    tqdm.std.tqdm; its TQDM_DISABLE variable is read at import, too early to help here)."""
    from tqdm import std

    original = std.tqdm.__init__

    def disabled(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = disabled
    try:
        yield
    finally:
        std.tqdm.__init__ = original


def load(args, device: str | None = None, **kwargs):
    """(model, tokenizer) for the command's --model, --device (or `device`), --device-map and
    --dtype, with the one stderr line that says how long it took."""
    started = time.perf_counter()
    quiet = progress_bars_off() if not args.verbose else contextlib.nullcontext()
    with quiet:
        model, tokenizer = load_model(args.model, device=device if device is not None else args.device,
                                      dtype=args.dtype, device_map=options.device_map(args.device_map),
                                      progress=args.verbose, **kwargs)
    now = time.perf_counter()
    args.load_seconds = now - started
    since_start = now - getattr(args, "started", started)
    print(f"model {args.model} loaded in {args.load_seconds:.1f} s, {since_start:.1f} s since start",
          file=sys.stderr, flush=True)
    if args.device_map is not None:
        print(f"device map: {device_split(model)}", file=sys.stderr, flush=True)
    return model, tokenizer
