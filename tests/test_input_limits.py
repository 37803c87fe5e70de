"""Inputs a model cannot take are refused before its forward, naming the limit
(recon_fast.trace.input_limits): a sequence longer than a learned position table, token type ids
out of range, an empty batch or an empty sequence in it; in the Tracer, attribution, datasets (a
document is cut to the table, counted in the manifest) and the CLI.

Which families have a length limit is checked against the model itself: for each family, the
plain forward (no recon-fast) at the limit works and one token past it fails when position_limit
says there is a limit; when it says None, the plain forward runs past the config's
max_position_embeddings and gives finite logits (rotary positions are computed, not looked up)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, make_model, save_model_folder, word_tokenizer

from recon_fast.trace.input_limits import position_limit
from recon_fast.trace.tracer import Tracer


def opt_model():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=40, word_embed_proj_dim=32)
    return OPTForCausalLM(config).eval()


def roberta_model():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                           num_attention_heads=4, max_position_embeddings=40, pad_token_id=1)
    return RobertaModel(config).eval()


FAMILIES = {"gpt2": lambda: make_model("gpt2"), "bert": lambda: make_model("bert"), "opt": opt_model,
            "roberta": roberta_model, "llama": lambda: make_model("llama"), "neox": lambda: make_model("neox"),
            "qwen2": lambda: make_model("qwen2")}
EXPECTED = {"gpt2": 128, "bert": 128, "opt": 40, "roberta": 38, "llama": None, "neox": None, "qwen2": None}


def ids_of(length: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_position_limit_is_the_models_own(family):
    model = FAMILIES[family]()
    limit = position_limit(model)
    assert limit == EXPECTED[family]
    with torch.no_grad():
        if limit is not None:
            model(input_ids=ids_of(limit))  # the whole table is usable
            with pytest.raises((IndexError, RuntimeError)):  # and one more is what the table cannot index
                model(input_ids=ids_of(limit + 1))
        else:
            trained = model.config.max_position_embeddings
            out = model(input_ids=ids_of(trained + 8))
            assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family", ["gpt2", "opt", "roberta"])
def test_tracer_refuses_too_long_before_forward(family):
    model = FAMILIES[family]()
    limit = EXPECTED[family]
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    with Tracer(model, layers="residual") as tracer:
        with pytest.raises(ValueError, match=f"{limit + 1} tokens long.*holds {limit} positions"):
            tracer.run(ids_of(limit + 1))
        assert calls == []  # refused before the forward
        tracer.run(ids_of(limit))  # the limit itself runs
    handle.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_token_type_ids_out_of_range():
    model = make_model("bert")
    ids = ids_of(6)
    with Tracer(model, layers="residual") as tracer:
        tracer.run({"input_ids": ids, "token_type_ids": torch.ones_like(ids)})  # type 1 of 2: fine
        with pytest.raises(ValueError, match="token_type_ids: type id 2 .* 2 token types"):
            tracer.run({"input_ids": ids, "token_type_ids": torch.full_like(ids, 2)})
        with pytest.raises(ValueError, match="type id -1"):
            tracer.run({"input_ids": ids, "token_type_ids": torch.full_like(ids, -1)})


def test_empty_batch_and_empty_sequences():
    model = make_model("llama")
    with Tracer(model, layers="residual") as tracer:
        with pytest.raises(ValueError, match="at least one token"):
            tracer.run(torch.zeros((0, 4), dtype=torch.long))
        with pytest.raises(ValueError, match="at least one token"):
            tracer.run(torch.zeros((2, 0), dtype=torch.long))
        ids = ids_of(4).repeat(2, 1)
        mask = torch.ones_like(ids)
        mask[1] = 0
        with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] of the batch is empty"):
            tracer.run({"input_ids": ids, "attention_mask": mask})
        with pytest.raises(ValueError, match="every sequence of the batch is empty"):
            tracer.run({"input_ids": ids, "attention_mask": torch.zeros_like(ids)})


def test_attribution_refuses_too_long():
    from recon_fast.attribution.direct import direct_logit_attribution
    from recon_fast.attribution.logit_lens import logit_lens

    model = make_model("gpt2")
    with pytest.raises(ValueError, match="holds 128 positions"):
        direct_logit_attribution(model, ids_of(129))
    with pytest.raises(ValueError, match="holds 128 positions"):
        logit_lens(model, ids_of(129))


def test_dataset_cuts_documents_to_the_table_and_counts_them(tmp_path):
    pytest.importorskip("pyarrow")
    from recon_fast.dataset import open as open_dataset, trace_dataset

    model = make_model("gpt2")
    tokenizer = word_tokenizer()
    texts = [" ".join(f"t{2 + (i + j) % (VOCAB - 2)}" for j in range(n)) for i, n in enumerate([10, 90, 300, 5, 200])]
    full = [len(ids) for ids in tokenizer(texts)["input_ids"]]  # untruncated, the reference
    assert max(full) > 128 > min(full)
    manifest = trace_dataset(model, tokenizer, texts, tmp_path / "out", max_tokens=None,
                             batch_tokens=512, docs_per_shard=4)
    assert manifest["settings"]["max_tokens"] == 128
    assert manifest["truncated_documents"] == sum(n > 128 for n in full)
    tokens = open_dataset(tmp_path / "out").documents(["doc_id", "tokens"]).column("tokens").to_pylist()
    assert tokens == [min(n, 128) for n in full]
    # A max_tokens under the table is the user's and stays; its cuts are counted too.
    manifest = trace_dataset(model, tokenizer, texts, tmp_path / "cut", max_tokens=64,
                             batch_tokens=512, docs_per_shard=4)
    assert manifest["settings"]["max_tokens"] == 64
    assert manifest["truncated_documents"] == sum(n > 64 for n in full)


def test_cli_refuses_too_long_in_one_line(tmp_path, capsys):
    from recon_fast.cli import main

    folder = save_model_folder(tmp_path / "gpt2", "gpt2")
    prompt = " ".join(["t5"] * 129)
    capsys.readouterr()  # saving the model printed its own progress
    assert main(["trace", "--prompt", prompt, "--model", str(folder), "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    loaded, error = err.splitlines()  # the load's own line, then the one-line error
    assert loaded.startswith("model ") and " loaded in " in loaded, err
    assert "129 tokens long" in error and "128 positions" in error, err
    assert not (tmp_path / "c.json").exists()
