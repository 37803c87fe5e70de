"""recon_fast.models.load_model on local folders: the auto class comes from the checkpoint's
config (an encoder stays an encoder), and weights the checkpoint lacks are never traced silently."""

import json

import pytest
import torch

from recon_fast.models import ModelNotFound, load_model

from tiny_models import make_model, save_model_folder


def test_an_encoder_checkpoint_loads_as_the_encoder_it_is(tmp_path):
    folder = save_model_folder(tmp_path / "bert", model=make_model("bert"))  # a MiniLM-like BertModel
    model, _ = load_model(str(folder))
    assert type(model).__name__ == "BertModel"
    original = make_model("bert")
    torch.testing.assert_close(model.embeddings.word_embeddings.weight, original.embeddings.word_embeddings.weight)
    assert not model.training


def test_a_causal_checkpoint_still_loads_as_a_causal_lm(tmp_path):
    model, _ = load_model(str(save_model_folder(tmp_path / "llama")))
    assert type(model).__name__ == "LlamaForCausalLM"


def test_weights_missing_from_the_checkpoint_are_an_error_not_random_numbers(tmp_path):
    folder = save_model_folder(tmp_path / "bert", model=make_model("bert"))
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]  # claims a head the weights do not hold
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"not in the checkpoint.*cls\.predictions"):
        load_model(str(folder))


def test_an_empty_folder_is_named_in_one_line(tmp_path):
    with pytest.raises(ModelNotFound, match="config.json") as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)
