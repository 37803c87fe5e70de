"""Chaos for the dataset pipeline: trace_dataset / `recon-fast trace-dataset` (one process, two
gloo ranks, and one process with attention statistics) SIGKILLed at seeded random moments, resumed
after each, must end with exactly the output of a run never interrupted: the same files (no
temporaries or progress files left), byte-identical Parquet shards and profile.json, and the same
manifest but for its timing. And a full disk (a small tmpfs as --out): the CLI fails with one line
naming the file, the committed shards stay intact, and --resume completes once there is space.

The moments are bytes of the run's writes (RECON_FAST_DATASET_FAULT=kill-at-byte:RANK:N, see
recon_fast.dataset.writing): a file of the run is drawn, then a byte inside it, so a kill lands in
the middle of a shard's temporary, between a shard's files, or while profile.json or manifest.json
is written; the last kill of each series is in profile.json or manifest.json.

Runs are forked from this process, the model loaded once (as the CLI loads it), so a run takes
about a second: two ranks form a gloo group from torchrun's variables, and when one is killed the
survivor is stopped as torchrun's agent does (SIGTERM, then SIGKILL). CI kills 3 times a series.
RECON_FAST_CHAOS=long kills 10-12 times a series, also at random wall-clock moments and right
after commits, kills at every file's first and middle byte, and runs torchrun itself (~20 s a run
on the 2-core machine; CI's torchrun kill is test_dataset.py's). The model, tokenizer and
documents are test_dataset.py's (a tiny random Llama saved to a folder)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import shutil
import socket
import subprocess
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")
from test_dataset import (  # noqa: E402,F401 (assets: a fixture, used by name)
    ATTENTION_KWARGS,
    KWARGS,
    SETTINGS,
    assert_same_output,
    assets,
    first_texts,
    torchrun,
)

LONG = os.environ.get("RECON_FAST_CHAOS") == "long"
KILLS = {1: 12, 2: 10} if LONG else {1: 3, 2: 3}  # kills per series: ranks -> count
SEED = 21


@pytest.fixture(scope="module")
def loaded(assets):
    """The model and tokenizer as the CLI loads them (so the manifest's provenance is the CLI's),
    in this process: forked runs start in milliseconds instead of importing torch again."""
    from recon_fast.models import load_model

    folder, _, _ = assets
    model, tokenizer = load_model(str(folder / "model"), progress=False)
    return folder, model, tokenizer


def forked(loaded, out: Path, ranks: int, *, resume: bool, env: dict | None = None,
           kill_after_s: float | None = None, progress: bool | None = None, attention: bool = False) -> list[int]:
    """trace_dataset into `out` on `ranks` forked processes (two: a gloo group, as torchrun would
    set up). When one dies, the others are stopped as torchrun stops a failed run's ranks (a
    survivor would otherwise wait in the next collective). kill_after_s: SIGKILL every rank then.
    progress: trace_dataset's (True: the ranks' progress files under DIR/.progress, bars drawn).
    attention: test_dataset's attention run instead (its first documents, three files a shard).
    Returns the ranks' exit statuses (os.waitstatus_to_exitcode: -9 for a kill)."""
    from recon_fast.dataset import trace_dataset, writing

    folder, model, tokenizer = loaded
    port = free_port()
    children = []
    for rank in range(ranks):
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.environ.update(env or {})
                if ranks > 1:
                    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                writing._fault.cache_clear()  # the parent's (none) was read already
                torch.set_num_threads(1)  # as torchrun gives each rank: bit-identical kernels
                source, settings = ((first_texts(folder), ATTENTION_KWARGS) if attention
                                    else (str(folder / "docs.jsonl"), KWARGS))
                trace_dataset(model, tokenizer, source, str(out), resume=resume, progress=progress, **settings)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)
    deadline = time.monotonic() + (kill_after_s if kill_after_s is not None else 300)
    statuses: dict[int, int] = {}
    failed_at = None
    while len(statuses) < len(children):
        for pid in children:
            if pid not in statuses:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
        now = time.monotonic()
        if failed_at is None and any(code != 0 for code in statuses.values()):
            failed_at = now
        # torchrun's way: SIGTERM to the survivors of a failed rank (atomic_write removes its
        # temporary then), SIGKILL to what is left after a grace period; a timed kill: SIGKILL.
        stop = (signal.SIGKILL if now > deadline or (failed_at is not None and now > failed_at + 5)
                else signal.SIGTERM if failed_at is not None else None)
        for pid in children if stop is not None else ():
            if pid not in statuses:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, stop)
        time.sleep(0.01)
    return [statuses[pid] for pid in children]


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def references(loaded, tmp_path_factory):
    """Uninterrupted runs of one process, of two ranks, and of one process with attention
    statistics ("attention"): what every chaos series must end with."""
    found = {}
    for key, ranks in ((1, 1), (2, 2), ("attention", 1)):
        found[key] = tmp_path_factory.mktemp(f"reference{key}") / "out"
        assert forked(loaded, found[key], ranks, resume=False, attention=key == "attention") == [0] * ranks
    return found


def files(out: Path) -> dict[str, bytes]:
    """Every file under `out` (temporaries and hidden folders included), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def untimed(manifest: dict) -> dict:
    """A manifest without what differs between an interrupted and an uninterrupted run: its
    duration, and how many shards each rank found already done."""
    manifest = {key: value for key, value in manifest.items() if key != "seconds"}
    manifest["ranks"] = [{k: v for k, v in r.items() if k != "resumed_shards"} for r in manifest["ranks"]]
    return manifest


def assert_identical(out: Path, reference: Path, moments: list[str]) -> None:
    got, want = files(out), files(reference)
    assert sorted(got) == sorted(want), f"files differ from the uninterrupted run's after kills at {moments}"
    assert_same_output(out, reference)  # the tables, column by column (says which differs)
    for name in want:
        if name.endswith(".parquet") or name == "profile.json":
            assert got[name] == want[name], f"{name} differs from the uninterrupted run's"
    assert untimed(json.loads(got["manifest.json"])) == untimed(json.loads(want["manifest.json"]))


def writes(reference: Path, out: Path, rank: int) -> list[tuple[str, int]]:
    """The files (relative path, size) that a resumed run of `rank` into `out` will write, in
    order, as the uninterrupted run wrote them: each shard not yet committed (documents, attention
    when traced, then activations, the commit), then on rank 0 profile.json and manifest.json."""
    manifest = json.loads((reference / "manifest.json").read_text())
    order = []
    for shard in manifest["shards"]:
        if shard["rank"] == rank and not (out / shard["activations"]).exists():
            order += [shard[key] for key in ("documents_file", "attention", "activations") if key in shard]
    if rank == 0:
        order += ["profile.json", "manifest.json"]
    return [(name, (reference / name).stat().st_size) for name in order]


def draw_moment(rng: np.random.Generator, reference: Path, out: Path, ranks: int,
                last: bool) -> tuple[dict, str]:
    """A seeded moment to kill at: (the fault's environment, what it hits). The last kill of a
    series lands in profile.json or manifest.json, so every series covers that moment too."""
    rank = 0 if last else int(rng.integers(ranks))
    order = writes(reference, out, rank)
    if not order:  # that rank has committed all its shards: it writes nothing more
        rank, order = 0, writes(reference, out, 0)
    if last:
        order_index = int(rng.integers(len(order) - 2, len(order)))
    else:
        order_index = int(rng.integers(len(order)))
    start = sum(size for _, size in order[:order_index])
    name, size = order[order_index]
    at = start + int(rng.integers(size))  # 0: right before the file's first byte
    return ({"RECON_FAST_DATASET_FAULT": f"kill-at-byte:{rank}:{at}"},
            f"rank {rank}, byte {at - start} of {size} of {name}")


def chaos(loaded, reference: Path, out: Path, ranks: int, kills: int, rng: np.random.Generator,
          attention: bool = False) -> list[str]:
    """Kill a run `kills` times at drawn moments, resuming each time; then a last resume."""
    moments = []
    for i in range(kills):
        env, moment = draw_moment(rng, reference, out, ranks, last=i == kills - 1)
        moments.append(moment)
        # Every other killed run draws progress bars: their files must not outlive it either.
        codes = forked(loaded, out, ranks, resume=i > 0, env=env, progress=i % 2 == 0, attention=attention)
        assert -signal.SIGKILL in codes, f"not killed at {moment}: exit codes {codes}"
        assert not (out / "manifest.json").exists(), f"a run killed at {moment} left a manifest"
    if LONG:  # also at wall-clock moments (tracing, merging, gathering) and right after commits
        for _ in range(kills // 2):
            forked(loaded, out, ranks, resume=True, kill_after_s=float(rng.uniform(0.05, 1.5)), attention=attention)
            fault = f"kill:{int(rng.integers(ranks))}:{int(rng.integers(4))}"
            forked(loaded, out, ranks, resume=True, env={"RECON_FAST_DATASET_FAULT": fault}, attention=attention)
    assert forked(loaded, out, ranks, resume=True, attention=attention) == [0] * ranks, \
        f"resume after kills at {moments} failed"
    return moments


@pytest.mark.parametrize("key", [1, 2, "attention"], ids=["one-process", "two-ranks", "one-process-attention"])
def test_killed_at_random_moments_resumes_to_identical_output(loaded, references, tmp_path, key):
    ranks = 2 if key == 2 else 1
    rng = np.random.default_rng([SEED, ranks, key == "attention"])
    moments = chaos(loaded, references[key], tmp_path / "chaos", ranks, KILLS[ranks], rng, attention=key == "attention")
    assert len(moments) == KILLS[ranks] and any("profile" in m or "manifest" in m for m in moments)
    assert_identical(tmp_path / "chaos", references[key], moments)


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder` (root, and a kernel that lets this container mount)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small disk needs `mount -t tmpfs`, which is not permitted here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.skipif(not LONG, reason="a kill at every file's first and middle byte: RECON_FAST_CHAOS=long")
@pytest.mark.parametrize("key", [1, "attention"], ids=["one-process", "one-process-attention"])
def test_killed_at_every_file_boundary_resumes_to_identical_output(loaded, references, tmp_path, key):
    """Systematically: for each file the run writes, in order, a kill right before its first byte
    and one in its middle, resuming after each."""
    reference, out, moments = references[key], tmp_path / "sweep", []
    names = [name for name, _ in writes(reference, out, 0)]
    for name in names:
        for part in (0.0, 0.5):
            order = writes(reference, out, 0)
            index = [n for n, _ in order].index(name)
            at = sum(size for _, size in order[:index]) + int(part * order[index][1])
            moments.append(f"byte {at} ({name}, {part:.0%})")
            codes = forked(loaded, out, 1, resume=bool(moments[:-1]), attention=key == "attention",
                           env={"RECON_FAST_DATASET_FAULT": f"kill-at-byte:0:{at}"})
            assert codes == [-signal.SIGKILL], f"not killed at {moments[-1]}: {codes}"
    assert forked(loaded, out, 1, resume=True, attention=key == "attention") == [0]
    assert_identical(out, reference, moments)


def pages(size: int) -> int:
    return -(-size // 4096) * 4096  # what a file takes on a tmpfs


@pytest.mark.parametrize("fills_in", ["shards", "profile"])
def test_full_disk_fails_in_one_line_and_resumes_to_identical_output(loaded, references, tmp_path, capfd, fills_in):
    """The disk fills while a shard is written, or (every shard committed) while profile.json is:
    the CLI says so in one line naming the file, keeps what was committed, and --resume finishes
    once a filler file is deleted. capfd: pyarrow's own output to the terminal would count too."""
    from recon_fast.cli import main

    folder, _, _ = loaded
    want = files(references[1])
    shard_files = sum(pages(len(data)) for name, data in want.items() if name.endswith(".parquet"))
    room = shard_files // 3 if fills_in == "shards" else shard_files + 4096  # profile.json takes 4 pages
    command = ["trace-dataset", "--data", str(folder / "docs.jsonl"), "--model", str(folder / "model"), *SETTINGS]
    with small_disk(tmp_path / "disk", "2m") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - room))
        out = disk / "out"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the reference's ranks
        try:
            assert main([*command, "--out", str(out)]) == 2
            err = capfd.readouterr().err
            # After the CLI's "model ... loaded in N s" line: one line, naming the problem and the
            # file, saying what to do; no traceback.
            loaded, _, err = err.partition("\n")
            assert " loaded in " in loaded, loaded
            written = "profile.json" if fills_in == "profile" else ".parquet"
            assert err.count("\n") == 1 and err.startswith(f"recon-fast: no space left on device writing {out}/"), err
            assert f"{written}: " in err and "--resume" in err and "Traceback" not in err, err
            # What was committed is intact (byte for byte the uninterrupted run's); nothing half-written.
            kept = files(out)
            assert "activations/rank0/part-00000.parquet" in kept, "the disk filled before the first shard"
            assert not any(Path(name).name.startswith(".") for name in kept), kept
            assert "manifest.json" not in kept and "profile.json" not in kept
            if fills_in == "profile":
                assert {name for name in kept} == {name for name in want if name.endswith(".parquet")}
            for name, data in kept.items():
                assert data == want[name], f"{name} was committed damaged"
            filler.unlink()  # space freed: the run continues from its committed shards
            assert main([*command, "--out", str(out), "--resume"]) == 0, capfd.readouterr().err
        finally:
            torch.set_num_threads(threads)
        assert_identical(out, references[1], ["a full disk"])


@pytest.mark.skipif(not LONG, reason="torchrun starts a Python per rank (~20 s a run on the 2-core CI machine): "
                                      "RECON_FAST_CHAOS=long; CI kills two ranks forked above, and test_dataset.py "
                                      "kills a torchrun rank after a commit")
def test_torchrun_killed_while_writing_resumes_to_identical_output(assets, loaded, references, tmp_path):
    """The same under torchrun itself (its agent stops the surviving rank), killed inside a
    temporary of either rank or a top-level file of rank 0."""
    folder, _, _ = assets
    rng = np.random.default_rng([SEED, 3])
    out = tmp_path / "torchrun"
    moments = []
    for i in range(KILLS[2] // 2):
        env, moment = draw_moment(rng, references[2], out, 2, last=False)
        moments.append(moment)
        killed = torchrun(folder, out, *(("--resume",) if i else ()), env=env)
        assert killed.returncode != 0 and not (out / "manifest.json").exists(), moment
    resumed = torchrun(folder, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(out, references[2], moments)
