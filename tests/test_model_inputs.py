"""recon_fast.trace.model_inputs, which the Tracer asks on every run: model_placement (the model's
device and dtype from one look at its first parameter where that is what model_device and
model_dtype would say, their answers elsewhere; meta["dtype"] and meta["device"] run after run),
the vocabulary of a replaced or resized embedding, and token texts reused for the same ids."""

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


def test_token_texts_of_the_same_ids_are_reused_and_each_call_gets_its_own_lists():
    from recon_fast.trace.model_inputs import token_texts

    tokenizer = CountingTokenizer()
    first = token_texts(tokenizer, [[1, 2, 3]])
    again = token_texts(tokenizer, [[1, 2, 3]])
    assert first == again == [["<1>", "<2>", "<3>"]] and tokenizer.decoded == 3
    again[0][0] = "changed"  # a cube's tokens are its own
    assert token_texts(tokenizer, [[1, 2, 3]]) == first and tokenizer.decoded == 3
    assert token_texts(tokenizer, [[1, 2, 4]]) == [["<1>", "<2>", "<4>"]] and tokenizer.decoded == 6
    other = CountingTokenizer()  # another tokenizer decodes for itself
    assert token_texts(other, [[1, 2, 4]]) == [["<1>", "<2>", "<4>"]] and other.decoded == 3
    assert token_texts(None, [[7, 8]]) == [["7", "8"]] == token_texts(None, [[7, 8]])
    assert token_texts(None, [[7, 9]]) == [["7", "9"]]
