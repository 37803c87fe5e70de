"""One protocol for every capture kind (session.Capture, made by a session.CaptureKind): a kind
defined here alone, given to a Tracer without touching tracer.py, records during the pass and gets
its part into the cube, in memory and streamed; the Tracer reads nothing of a capture that the
protocol does not declare; and the built-in kinds make a capture only when asked for."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, make_model

from recon_fast import RawSlices, Tracer
from recon_fast.trace.session import Capture, Layout, Session
from recon_fast.trace.stats_arena import StatsArena
from recon_fast.trace.tracer import CAPTURE_KINDS

pytestmark = pytest.mark.filterwarnings("ignore:predicted tokens")


class PredictedTokens(Capture):
    """The model's most likely next token at every position, recorded by a forward hook of its own
    (no Tracer hook needed); its part: a meta entry, and one line to the user."""

    hookless = True

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.predicted: list[torch.Tensor] = []  # [batch, tokens] per forward

    @contextlib.contextmanager
    def recording(self):
        handle = self.model.register_forward_hook(lambda m, i, out: self.predicted.append(out.logits.argmax(-1)))
        try:
            yield
        finally:
            handle.remove()

    def cube_part(self, layout: Layout) -> dict:
        return {"meta": {"predicted": torch.cat(self.predicted, dim=1).tolist()}}

    def warnings(self, layout: Layout) -> list[str]:
        return [f"predicted tokens at {sum(p.shape[1] for p in self.predicted)} positions"]


def predicted_tokens_kind(tracer, session: Session) -> PredictedTokens | None:
    return PredictedTokens(tracer.model) if getattr(tracer, "predict", True) else None


def _ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def test_a_kind_of_ones_own_gets_its_part_into_the_cube(tmp_path):
    model = make_model("llama")
    ids = _ids()
    plain = Tracer(model, layers="residual")
    plain.run(ids)
    tracer = Tracer(model, layers="residual")
    tracer.capture_kinds += (predicted_tokens_kind,)
    with torch.no_grad():
        expected = model(ids).logits.argmax(-1).tolist()
    with pytest.warns(UserWarning, match="predicted tokens at 7 positions"):
        tracer.run(ids)
    cube = tracer.cube
    assert cube.meta["predicted"] == expected
    # the other parts as they were without it
    assert cube.layer_names == plain.cube.layer_names
    np.testing.assert_array_equal(cube.data, plain.cube.data)
    assert "predicted" not in plain.cube.meta and Tracer.capture_kinds == CAPTURE_KINDS  # one Tracer's own
    # streamed: its part goes with the cube's shell
    streamed = Tracer(model, layers="residual", stream_to=str(tmp_path / "cube.json"))
    streamed.capture_kinds = (*streamed.capture_kinds, predicted_tokens_kind)
    streamed.run(ids)
    assert json.loads((tmp_path / "cube.json").read_text())["meta"]["predicted"] == expected
    # a kind that records without hooks lets a Tracer with none run
    alone = Tracer(model)
    alone.capture_kinds += (predicted_tokens_kind,)
    alone.run(ids)
    assert alone.cube.meta["predicted"] == expected and alone.cube.num_layers == 0
    # and where its settings do not ask for it, it makes no capture
    plain.capture_kinds += (predicted_tokens_kind,)
    plain.predict = False
    plain.run(ids)
    assert "predicted" not in plain.cube.meta


def test_the_built_in_kinds_make_a_capture_only_when_asked_for():
    model = make_model("llama")
    session = Session(StatsArena(), token_ids=True)
    asked = {"token statistics": Tracer(model), "attention='full'": Tracer(model, attention="full"),
             "attention='stats'": Tracer(model, attention="stats"), "raw=": Tracer(model, raw=RawSlices("lm_head"))}
    made = {setting: [kind.__name__ for kind in CAPTURE_KINDS if kind(tracer, session) is not None]
            for setting, tracer in asked.items()}
    assert made == {"token statistics": ["token_stats_kind"],
                    "attention='full'": ["token_stats_kind", "full_attention_kind"],
                    "attention='stats'": ["token_stats_kind", "attention_stats_kind"],
                    "raw=": ["token_stats_kind", "raw_slices_kind"]}
    for setting, tracer in asked.items():
        for kind in CAPTURE_KINDS:
            capture = kind(tracer, session)
            assert capture is None or isinstance(capture, Capture), (setting, kind.__name__)


class Watched(PredictedTokens):
    """PredictedTokens, noting every attribute read of it."""

    read: set[str] = set()

    def __getattribute__(self, name: str):
        type(self).read.add(name)
        return super().__getattribute__(name)


def test_the_tracer_reads_only_what_the_protocol_declares(tmp_path):
    """Every member the Tracer reads of a capture, in every kind of run, is one session.Capture
    declares: a kind that follows the protocol is all a Tracer needs."""
    model = make_model("llama")
    declared = {name for name in vars(Capture) if not name.startswith("_")} | set(Capture.__annotations__)
    for layers, stream_to in (("residual", None), ("residual", tmp_path / "cube.json"),
                              ("residual", tmp_path / "cube.npz"), ([], None)):
        tracer = Tracer(model, layers=layers, stream_to=stream_to and str(stream_to))
        tracer.capture_kinds += (lambda tracer, session: Watched(tracer.model),)
        with pytest.warns(UserWarning, match="predicted tokens"):
            tracer.run(_ids())
            tracer.generate(_ids()[:1], max_new_tokens=2, do_sample=False)
    own = {"model", "predicted"}  # its own fields, read by its own methods
    undeclared = Watched.read - declared - own
    assert {"streams", "hookless", "slices_calls", "prepare", "recording", "cube_part", "stream_part",
            "warnings"} <= Watched.read
    assert not undeclared, f"the Tracer reads {sorted(undeclared)} of a capture; declare them in session.Capture"
