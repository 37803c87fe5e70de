"""The Tracer on models that do not take token ids (a CNN, an LSTM with forward(x), a ViT) and on
an encoder-decoder (T5), whose decoder runs on a token axis of its own; each checked against the
float64 statistics of the module outputs seen with plain torch hooks."""

import json
import warnings

import numpy as np
import pytest
import torch

from recon_fast import ActivityCube, Tracer

from test_tracer import all_module_hooks, assert_cube_layer_close
from tiny_models import VOCAB, SmallCNN, SmallLSTM, capture_outputs, make_t5, make_vit


def positions_of(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ..., T, D] -> [B, T, (...) * D]: the documented layout for inputs that are not token ids
    (the token axis is the second-to-last dim; the dims between it and the batch are features)."""
    if tensor.dim() == 2:
        return tensor.unsqueeze(1)
    return tensor.movedim(-2, 1).flatten(2)


def check_against_hooks(model, tracer, call):
    cube = tracer.cube
    seen = capture_outputs(model, sorted(set(cube.layer_names)), call)
    assert [n for n, _ in seen] == cube.layer_names
    length = cube.data.shape[2]
    for i, (name, tensor) in enumerate(seen):
        expected = positions_of(tensor)
        n = expected.shape[1]
        assert_cube_layer_close(cube.data[i, :, :n], expected)
        assert np.isnan(cube.data[i, :, n:]).all()  # shorter layers are NaN past their own length
        assert n <= length
    return cube


def test_cnn_takes_an_image_batch_positionally():
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped
        with Tracer(model) as tracer:
            tracer.add_hooks_all()
            out = tracer.run(x)
    assert out.shape == (2, 5)
    cube = check_against_hooks(model, tracer, lambda: model(x))
    assert cube.layer_names == ["conv1", "conv2", "head"]
    assert cube.data.shape[:3] == (3, 2, 32)  # conv1's rows (H = 32) are the longest
    assert cube.tokens == [[str(i) for i in range(32)]] * 2  # positions, not token text
    assert all_module_hooks(model) == 0


def test_lstm_with_a_custom_forward_x():
    model = SmallLSTM().eval()
    x = torch.randn(3, 6, 7, generator=torch.Generator().manual_seed(1))
    with Tracer(model, layers=["inp", "lstm", "out"]) as tracer:
        tracer.run(x)
    cube = check_against_hooks(model, tracer, lambda: model(x))
    assert cube.data.shape[:3] == (3, 3, 6)


@pytest.mark.parametrize("how", ["positional", "keyword", "dict"])
def test_vit_takes_pixel_values_any_way(how):
    model = make_vit()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    tracer = Tracer(model, layers="residual")
    if how == "positional":
        tracer.run(pixels)
    elif how == "keyword":
        tracer.run(pixel_values=pixels)
    else:
        tracer.run({"pixel_values": pixels})
    cube = check_against_hooks(model, tracer, lambda: model(pixel_values=pixels))
    assert cube.data.shape[:3] == (2, 2, 5)  # 4 patches + the CLS token
    assert cube.meta["input_shape"] == [2, 5]


def test_t5_decoder_layers_are_on_a_token_axis_of_their_own(tmp_path):
    model = make_t5()
    source = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    target = torch.randint(2, VOCAB, (2, 3), generator=torch.Generator().manual_seed(4))
    with Tracer(model) as tracer:
        tracer.add_hooks_all()
        with pytest.warns(UserWarning, match="not traced") as record:
            tracer.run(source, decoder_input_ids=target)
    cube = tracer.cube
    # only the relative position bias ([queries, keys, heads]: no batch, no token axis) is left out
    assert {s["layer_name"].rsplit(".", 1)[-1] for s in cube.meta["skipped"]} == {"relative_attention_bias"}
    assert sum("not traced" in str(w.message) for w in record) == 1
    seen = capture_outputs(model, sorted(set(cube.layer_names)), lambda: model(source, decoder_input_ids=target))
    assert [n for n, _ in seen] == cube.layer_names and len(seen) > 40
    axes = [cube.token_axis(i) for i in range(cube.num_layers)]
    assert axes.count("decoder_tokens") > 0 and axes.count("tokens") > 0
    for i, (name, tensor) in enumerate(seen):
        # the decoder's cross-attention keys and values are made from the encoder's output
        on_decoder = tensor.shape[1] == 3 and (name.startswith("decoder") or name in ("lm_head", "shared"))
        assert axes[i] == ("decoder_tokens" if on_decoder else "tokens"), name
        assert_cube_layer_close(cube.layer(i), tensor)
        assert cube.layer(i).shape[1] == (3 if on_decoder else 7)
    assert cube.tokens == [[str(t) for t in row] for row in source.tolist()]
    assert cube.decoder_tokens == [[str(t) for t in row] for row in target.tolist()]
    # JSON: the existing keys as they were, the decoder axis and each layer's axis added
    path = tmp_path / "t5.json"
    cube.export_json(path)
    doc = json.loads(path.read_text())
    assert list(doc) == ["meta", "tokens", "decoder_tokens", "layers", "provenance"]
    assert doc["tokens"] == cube.tokens and doc["decoder_tokens"] == cube.decoder_tokens
    decoder_layer = next(entry for entry in doc["layers"] if entry["layer_name"] == "lm_head")
    assert decoder_layer["token_axis"] == "decoder_tokens"
    assert len(decoder_layer["core_metrics"]["energy"][0]) == 3
    encoder_layer = doc["layers"][1]
    assert encoder_layer["token_axis"] == "tokens" and len(encoder_layer["core_metrics"]["energy"][0]) == 7
    for load in (path, cube.export_npz(tmp_path / "t5.npz") or tmp_path / "t5.npz"):
        back = ActivityCube.load(load)
        np.testing.assert_array_equal(back.data, cube.data)
        assert back.decoder_tokens == cube.decoder_tokens
        assert [back.token_axis(i) for i in range(back.num_layers)] == axes


def test_the_forward_signature_is_remembered_per_function_and_follows_a_replaced_forward():
    """prepare_call passes token ids by name when forward's first parameter is input_ids, else
    positionally. The name is read once per forward function (inspect.signature on every run was
    ~90 us of host time); a forward set on one instance, as accelerate's hooks do, is its own."""
    import functools

    from torch import nn

    from recon_fast.trace.model_inputs import prepare_call

    class ById(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, 4)

        def forward(self, input_ids):
            return self.embedding(input_ids)

    first, second = ById(), ById()
    ids = torch.tensor([[1, 2, 3]])
    for model in (first, second, first):
        call = prepare_call(model, None, (ids,), {})
        assert call.args == () and torch.equal(call.kwargs["input_ids"], ids)
    second.forward = functools.partial(lambda tokens, module: module.embedding(tokens), module=second)
    call = prepare_call(second, None, (ids,), {})
    assert "input_ids" not in call.kwargs and torch.equal(call.args[0], ids)
    assert torch.equal(Tracer(second, layers=["embedding"]).run(ids), second.embedding(ids))
    call = prepare_call(first, None, (ids,), {})  # the class's forward keeps its own answer
    assert call.args == () and torch.equal(call.kwargs["input_ids"], ids)
