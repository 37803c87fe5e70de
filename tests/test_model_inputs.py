"""recon_fast.trace.model_inputs, which the Tracer asks on every run: model_placement (the model's
device and dtype from one look at its first parameter where that is what model_device and
model_dtype would say, their answers elsewhere; meta["dtype"] and meta["device"] run after run),
the vocabulary of a replaced or resized embedding (or of an instance's own get_input_embeddings),
token texts reused for the same ids without a tokenizer, and meta's backend after the library's
registrations change."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from recon_fast import Tracer
from recon_fast.kernels import token_stats as ops
from recon_fast.trace.model_inputs import model_device, model_dtype, model_placement

from tiny_models import VOCAB, make_model


class OwnDevice(nn.Module):
    """A model whose `device` is its own, not its first parameter's."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu", 0)  # not the parameter's torch.device("cpu"): this one is asked

    def forward(self, ids):
        return self.embed(ids)


class Plain(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8, dtype=dtype)

    def forward(self, ids):
        return self.embed(ids)


@pytest.mark.parametrize("make", [lambda: make_model("llama"), lambda: make_model("bert"), Plain,
                                  lambda: Plain(torch.float64), OwnDevice, nn.ReLU],
                         ids=["llama", "bert", "plain", "plain float64", "own device", "no parameters"])
def test_placement_is_model_device_and_model_dtype(make):
    model = make()
    assert model_placement(model) == (model_device(model), model_dtype(model))


def test_a_device_of_the_models_own_is_asked():
    assert model_placement(OwnDevice())[0] == torch.device("cpu", 0)
    model = Plain()
    model.device = torch.device("cpu", 0)  # an instance attribute
    assert model_placement(model) == (torch.device("cpu", 0), torch.float32)


def test_the_tracers_meta_follows_the_models_dtype_between_runs():
    model = make_model("llama")
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with Tracer(model) as tracer:
        tracer.add_hooks_all()
        tracer.run(ids)
        assert tracer.cube.meta["dtype"] == "float32" and tracer.cube.meta["device"] == "cpu"
        assert tracer.cube.meta["backend"] == ops.backend("cpu")
        model.to(torch.float64)
        tracer.run(ids)
        assert tracer.cube.meta["dtype"] == "float64"


def test_the_vocabulary_follows_a_replaced_or_resized_embedding():
    from recon_fast.trace.model_inputs import vocabulary_size

    model = make_model("llama")
    assert vocabulary_size(model) == VOCAB
    model.resize_token_embeddings(VOCAB + 16)
    assert vocabulary_size(model) == VOCAB + 16
    model.set_input_embeddings(nn.Embedding(VOCAB - 8, 48))
    assert vocabulary_size(model) == VOCAB - 8
    with pytest.raises(ValueError, match=f"token id {VOCAB - 8} >= vocabulary size {VOCAB - 8}"):
        Tracer(model, layers="model.layers.0").run(torch.tensor([[1, VOCAB - 8]]))
    assert vocabulary_size(nn.Linear(2, 2)) is None


class CountingTokenizer:
    """batch_decode as a tokenizer's, counting the ids it decodes."""

    def __init__(self):
        self.decoded = 0

    def batch_decode(self, rows):
        self.decoded += len(rows)
        return [f"<{row[0]}>" for row in rows]


def test_token_texts_without_a_tokenizer_are_reused_and_a_tokenizer_decodes_every_time():
    from recon_fast.trace.model_inputs import token_texts

    rows = [[7, 8]]
    first = token_texts(None, rows)
    rows[0][0] = 9  # the caller's list changed in place: not the ids seen before
    assert first == [["7", "8"]] and token_texts(None, rows) == [["9", "8"]]
    again = token_texts(None, [[9, 8]])
    again[0][0] = "changed"  # a cube's tokens are its own
    assert token_texts(None, [[9, 8]]) == [["9", "8"]]
    tokenizer = CountingTokenizer()  # its decoding may change between runs: asked every time
    assert token_texts(tokenizer, [[1, 2]]) == token_texts(tokenizer, [[1, 2]]) == [["<1>", "<2>"]]
    assert tokenizer.decoded == 4


class Wrapper(nn.Module):
    """A wrapper whose __getattr__ hands back its inner model's attributes, `device` among them."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_a_device_handed_back_by_getattr_is_asked():
    model = Wrapper(OwnDevice())
    assert model_placement(model) == (model_device(model), model_dtype(model)) == (torch.device("cpu", 0),
                                                                                     torch.float32)


def test_an_instances_own_get_input_embeddings_is_asked_every_time():
    from recon_fast.trace.model_inputs import vocabulary_size

    model = make_model("llama")
    assert vocabulary_size(model) == VOCAB
    bigger = nn.Embedding(VOCAB + 50, 48)
    model.get_input_embeddings = lambda: bigger
    assert vocabulary_size(model) == VOCAB + 50


def test_meta_backend_follows_the_libraries_registrations(monkeypatch):
    model = make_model("llama")
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with Tracer(model) as tracer:
        tracer.add_hooks_all()
        tracer.run(ids)
        compiled = tracer.cube.data.copy()
        assert tracer.cube.meta["backend"] == ops.backend("cpu")
        monkeypatch.setitem(ops._COMPILED.registered, "CPU", False)  # as a build without the CPU kernel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's one-time warning may have been given before
            tracer.run(ids)
        assert tracer.cube.meta["backend"] == "torch"
        np.testing.assert_allclose(tracer.cube.data, compiled, rtol=1e-5, atol=1e-6)
