"""Shared benchmark helpers: the machine's name, bytes-per-second bookkeeping, and a closing table
of ratios measured side by side in the same run (each group's baseline is 1.00)."""

from __future__ import annotations

import platform
import time
from collections import defaultdict

import pytest
import torch


def machine_name(device: str = "cpu") -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def synchronized(fn, device: str, inner: int = 1):
    """Wraps fn so a timing covers the device work, not just its launch. On CUDA, `inner` calls
    are enqueued back to back before the one synchronize, so a ~100 us kernel is not timed
    together with a host round trip per call (the recorded time is divided by `inner`)."""
    if device != "cuda":
        return fn

    def run():
        for _ in range(inner):
            result = fn()
        torch.cuda.synchronize()
        return result

    return run


def wall_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.fixture
def alternating():
    """alternating(sides, timer=wall_seconds) -> one_round: each call of one_round() times every
    side of `sides` ({name: fn}) once and returns {name: seconds}, in the order reversed from the
    call before. In one fixed order each side inherits what the side before it left (caches, the
    allocator's state): a bias of 1-2% on this project's CPU figures (benchmarks/RESULTS.md, issue
    17's third stop). timer(fn) -> seconds (on CUDA, one that synchronizes)."""

    def make(sides: dict, timer=wall_seconds):
        order = list(sides.items())

        def one_round() -> dict[str, float]:
            seconds = {name: timer(fn) for name, fn in order}
            order.reverse()
            return seconds

        return one_round

    return make


_rows: dict[str, list[tuple[str, float, float | None, bool]]] = defaultdict(list)


@pytest.fixture
def record(benchmark):
    """record(group, name, fn, device, nbytes=None, baseline=False): benchmark fn and keep its
    median (and GB/s when nbytes is given) for the closing ratio table."""

    def _record(group, name, fn, device="cpu", nbytes=None, baseline=False, rounds=None, inner=1):
        benchmark.group = group
        benchmark.name = name
        benchmark.extra_info["machine"] = machine_name(device)
        benchmark.extra_info["calls per timing"] = inner
        fn = synchronized(fn, device, inner)
        fn()  # warm-up (and compilation, for torch.compile)
        if rounds:
            benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        else:
            benchmark(fn)
        median = benchmark.stats.stats.median / inner
        gbps = nbytes / median / 1e9 if nbytes else None
        if gbps is not None:
            benchmark.extra_info["GB/s"] = round(gbps, 2)
        _rows[group].append((name, median, gbps, baseline))

    return _record


_measures: dict[str, list[tuple[str, float, str, bool]]] = defaultdict(list)


@pytest.fixture
def record_measure(benchmark):
    """record_measure(group, name, value, unit, baseline=False): a measurement other than time
    (peak memory, say) for the closing table, with its ratio to the group's baseline; the value
    also goes in the benchmark's extra_info."""

    def _record(group, name, value, unit, baseline=False):
        benchmark.extra_info[f"{name} ({unit})"] = round(float(value), 3)
        _measures[group].append((name, float(value), unit, baseline))

    return _record


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    for group, rows in _measures.items():
        base = next((v for n, v, u, b in rows if b), None)
        tr.write_line(f"[{group}]")
        for name, value, unit, is_base in rows:
            ratio = f"{value / base:8.2f}x" if base else ""
            tr.write_line(f"  {name:<34} {value:12.3f} {unit} {ratio}{'  (baseline)' if is_base else ''}")
    if not _rows:
        return
    tr.section("recon-fast: ratios within each group (same run; time / baseline time)")
    for group, rows in _rows.items():
        base = next((m for n, m, g, b in rows if b), None)
        tr.write_line(f"[{group}]")
        for name, median, gbps, is_base in rows:
            ratio = f"{median / base:6.2f}x time" if base else ""
            bw = f"{gbps:8.2f} GB/s" if gbps is not None else ""
            tr.write_line(f"  {name:<34} {median * 1e3:10.3f} ms {bw} {ratio}{'  (baseline)' if is_base else ''}")
