"""`recon-fast attribute`, `cot` and `residual`: HexRay's console formats, on the real SmolLM2.
Most tests run the command in-process with the session's already-loaded model; one runs the
program as a user would, HexRay-style (no command word)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from recon_fast import cli
from recon_fast.attribution import direct_logit_attribution
from recon_fast.cli import attribution as attribution_cli
from recon_fast.cli import loading

pytestmark = pytest.mark.slow

# HexRay's line: "- MLP  L9 : +46.16 (24.3%)"
CONTRIBUTOR = re.compile(r"^- (MLP |Attn) L\d+ *: [+-]\d+\.\d\d \(\d+\.\d%\)$")
BAR = re.compile(r"^(MLP |Attn) L\d+ * █+ *[ -]*\d+\.\d%$")


@pytest.fixture
def run_cli(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: smollm2)

    def run(*argv):
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out

    return run


def test_attribute_prints_hexrays_format_with_exactly_k_lines(run_cli, smollm2):
    model, tokenizer = smollm2
    out = run_cli("attribute", "--prompt", "Why do bees buzz?", "--top-k-attribution", "10")
    expected = direct_logit_attribution(model, "Why do bees buzz?", tokenizer=tokenizer)
    shown = attribution_cli.shown_token(expected.target_text[0])
    assert out.startswith(f'Token: "{shown}" (index -1)\nTop Contributors to Final Logit:\n')
    lines = out.splitlines()
    contributors = [line for line in lines if line.startswith("- ")]
    assert len(contributors) == 10
    assert all(CONTRIBUTOR.match(line) for line in contributors), contributors
    # The listed values are the ten largest terms, in order, each as its HexRay name.
    for line, (label, value, percent) in zip(contributors, expected.top(10)):
        kind, layer = ("MLP" if label.endswith("mlp") else "Attn"), label.split(".")[0]
        assert line.split(":")[0].split() == ["-", kind, layer]
        assert f"{value:+.2f} ({percent:.1f}%)" in line


def test_attribute_top_k_per_head_target_and_logit_debug(run_cli):
    out = run_cli("attribute", "--prompt", "The capital of France is", "--top-k", "4", "--per-head",
                  "--target", " Paris", "--logit-debug", "--token-index", "-1")
    assert out.startswith('Token: " Paris" (index -1)')
    contributors = [line for line in out.splitlines() if line.startswith("- ")]
    assert len(contributors) == 4
    assert all(re.match(r"^- (MLP  L\d+ *|Head L\d+\.H\d+|Embed *) *: [+-]\d+\.\d\d \(\d+\.\d%\)$", c) for c in contributors)
    check = re.search(r"Logit check: model ([+-]\d+\.\d+), sum of (\d+) terms ([+-]\d+\.\d+)", out)
    assert check and check.group(1) == check.group(3) and int(check.group(2)) == 1 + 30 * 10


def test_cot_prints_one_block_per_step(run_cli):
    prompt = "John has 3 apples. He buys 2 more. How many apples does he have?"
    out = run_cli("cot", "--prompt", prompt, "--top-k", "5")
    assert out.startswith("Chain of Thought Attribution Trace (Console):\n")
    blocks = out.strip().split("\n\n")[1:]
    assert [b.splitlines()[0] for b in blocks] == [
        "Step 1: John has 3 apples.", "Step 2: He buys 2 more.", "Step 3: How many apples does he have?"]
    for block in blocks:
        lines = block.splitlines()
        assert lines[1].startswith('Token: "')
        bars = lines[2:]
        assert len(bars) == 5 and all(BAR.match(b) for b in bars), bars
        assert bars[0].count("█") == attribution_cli.BAR_WIDTH  # the largest bar is full width
        assert len({len(b) for b in bars}) == 1  # aligned


def test_hexray_cot_debug_flag_runs_the_chain_of_thought(run_cli):
    out = run_cli("--prompt", "If John has 3 apples...", "--cot-debug", "--top-k-attribution", "3")
    assert out.startswith("Chain of Thought Attribution Trace (Console):\n\nStep 1: If John has 3 apples...\n")


def test_residual_prints_a_row_per_layer_with_norms_and_the_lens(run_cli, smollm2):
    out = run_cli("residual", "--prompt", "The capital of France is")
    lines = out.splitlines()
    assert lines[0].startswith("Residual stream: 31 readings (embed + 30 blocks), shape [1, 5, 576]")
    norm_rows = [line for line in lines if re.match(r"^(embed|L\d+) +\[1, 5, 576\] norm ", line)]
    assert [row.split()[0] for row in norm_rows] == ["embed"] + [f"L{i}" for i in range(30)]
    assert all(len(row.split()) == 5 + 5 for row in norm_rows)  # layer, shape (3 words), "norm", 5 norms
    lens_rows = [line for line in lines if line.split()[:1] == ["lens"]]
    assert len(lens_rows) == 31


def test_residual_shows_and_unembeds_only_the_last_positions(run_cli):
    out = run_cli("residual", "--prompt", "The capital of France is", "--max-positions", "2", "--json")
    document = json.loads(out)
    assert document["positions"] == [3, 4] and len(document["token_ids"][0][0]) == 2
    assert len(document["norms"][0][0]) == 5
    table = run_cli("residual", "--prompt", "The capital of France is", "--max-positions", "2")
    assert "; last 2 of 5 positions" in table.splitlines()[0]
    norm_rows = [line for line in table.splitlines() if " norm " in line]
    assert len(norm_rows) == 31 and all(len(row.split()) == 5 + 2 for row in norm_rows)


def test_json_and_report(run_cli, smollm2, tmp_path):
    out = run_cli("attribute", "--prompt", "Why do bees buzz?", "--json", "--report", str(tmp_path))
    document = json.loads(out)
    sequence = document["sequences"][0]
    assert sum(sequence["values"]) == pytest.approx(sequence["logit"], rel=1e-4)
    ids = smollm2[1]("Why do bees buzz?")["input_ids"]  # the prompt's tokens, for the viewer's source names
    assert len(document["tokens"]) == len(ids) and "".join(document["tokens"]).endswith("buzz?")
    assert json.loads((tmp_path / "attribution.json").read_text()) == document
    png = (tmp_path / "attribution.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    run_cli("cot", "--prompt", "One. Two.", "--report", str(tmp_path))
    assert json.loads((tmp_path / "cot.json").read_text())["steps"][1]["text"] == "Two."
    assert (tmp_path / "cot.png").read_bytes().startswith(b"\x89PNG")


def test_bad_input_gets_one_line(run_cli, capsys):
    assert cli.main(["attribute", "--prompt", "hi", "--token-index", "40"]) == 2
    assert "position 40 is outside" in capsys.readouterr().err
    assert cli.main(["attribute", "--prompt", "hi", "--top-k", "0"]) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err


def test_hexray_command_line_as_a_user_runs_it():
    run = subprocess.run([sys.executable, "-m", "recon_fast.cli", "--prompt", "Why do bees buzz?",
                          "--top-k-attribution", "10"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    contributors = [line for line in run.stdout.splitlines() if line.startswith("- ")]
    assert len(contributors) == 10 and all(CONTRIBUTOR.match(line) for line in contributors)
    assert "Top Contributors to Final Logit:" in run.stdout


def test_a_model_not_available_offline_gets_a_clear_message():
    run = subprocess.run([sys.executable, "-m", "recon_fast.cli", "attribute", "--prompt", "hi", "--model",
                          "gpt2-small"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "not available offline" in run.stderr


# ---- issue 13: --versus, --neurons, --sources -----------------------------------------------------
def test_attribute_a_logit_difference(run_cli, smollm2):
    model, tokenizer = smollm2
    out = run_cli("attribute", "--prompt", "The capital of France is", "--target", " Paris", "--versus", " London",
                  "--top-k", "5", "--logit-debug")
    lines = out.splitlines()
    assert lines[0] == 'Token: " Paris" versus " London" (index -1)'
    assert lines[1] == "Top Contributors to Final Logit Difference:"
    assert len([line for line in lines if line.startswith("- ")]) == 5
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    import torch
    with torch.no_grad():
        logits = model(ids).logits[0, -1].double()
    paris, london = (tokenizer.encode(t, add_special_tokens=False)[0] for t in (" Paris", " London"))
    check = re.search(r"Logit check: model logit difference ([+-]\d+\.\d+), sum of \d+ terms ([+-]\d+\.\d+)", out)
    assert check and check.group(1) == check.group(2)
    assert float(check.group(1)) == pytest.approx(float(logits[paris] - logits[london]), abs=1e-3)


def test_attribute_neurons_lists_the_top_overall_and_per_layer(run_cli):
    out = run_cli("attribute", "--prompt", "Why do bees buzz?", "--neurons", "3", "--top-k", "4")
    lines = out.splitlines()
    overall = lines.index("Top 3 Neurons:")
    assert all(re.match(r"^- L\d+\.N\d+: [+-]\d+\.\d{3}$", line) for line in lines[overall + 1:overall + 4])
    per_layer = lines.index("Top 3 Neurons per Layer:")
    rows = lines[per_layer + 1:per_layer + 31]
    assert [row.split(":")[0] for row in rows] == [f"- L{i}" for i in range(30)]
    assert all(len(re.findall(r"N\d+ [+-]\d+\.\d{3}", row)) == 3 for row in rows)
    contributors = [line for line in lines[:overall] if line.startswith("- ")]
    assert len(contributors) == 4 and all(not re.match(r"^- MLP +L\d+ *:", c) for c in contributors)  # neurons replace MLPs


def test_attribute_sources_names_the_tokens_each_top_head_read(run_cli):
    out = run_cli("attribute", "--prompt", "The capital of France is", "--sources", "2", "--top-k", "3")
    lines = out.splitlines()
    start = lines.index("Top 3 Heads by Source Token:")
    heads = lines[start + 1:start + 4]
    assert len(heads) == 3, out
    for line in heads:
        assert re.match(r'^- Head L\d+\.H\d+ \([+-]\d+\.\d{3}\): "[^"]*"@\d +[+-]\d+\.\d{3}, "[^"]*"@\d +[+-]\d+\.\d{3}$', line), line



def test_sources_print_what_the_full_split_prints_from_the_top_sources_only(run_cli):
    """--sources 2 --top-k 3 keeps each head's 3 largest sources and a remainder (the prompt has 5
    tokens): the printed lines are those of --all-sources, the JSON says what it kept."""
    argv = ("attribute", "--prompt", "The capital of France is", "--sources", "2", "--top-k", "3")
    for share in ("top", "total"):
        assert run_cli(*argv, "--share", share) == run_cli(*argv, "--share", share, "--all-sources")
    top, full = json.loads(run_cli(*argv, "--json")), json.loads(run_cli(*argv, "--json", "--all-sources"))
    assert top["source_top_k"] == 3 and full["source_top_k"] is None
    assert len([label for label in top["labels"] if label.endswith(".S_rest")]) == 30 * 9
    assert len(top["labels"]) == len(full["labels"]) - 30 * 9 * (5 - 3 - 1)
    assert sum(top["sequences"][0]["values"]) == pytest.approx(full["sequences"][0]["total"], rel=1e-9)


def test_all_sources_needs_sources(run_cli, capsys):
    assert cli.main(["attribute", "--prompt", "hi", "--all-sources"]) == 2
    assert "--all-sources keeps every source term of --top-k-sources K" in capsys.readouterr().err

# ---- issue 12: --report pictures on the real model ---------------------------------------------------
def test_reports_show_mlp_terms_log_norms_and_step_text(run_cli, smollm2, tmp_path, monkeypatch):
    """SmolLM2's per-head picture has its MLPs beside the heads (the top contributor to "Why do
    bees buzz?" is an MLP), the residual norms are on a log scale (position 0's norm is ~1000x
    the others'), the CoT columns name their steps, and each command says where each file went."""
    from matplotlib import colors

    from recon_fast.cli import report

    figures = {}
    real = report.save_png
    monkeypatch.setattr(report, "save_png", lambda fig, folder, name: figures.setdefault(name, fig) and
                        real(fig, folder, name))
    out = run_cli("attribute", "--prompt", "Why do bees buzz?", "--per-head", "--top-k", "1", "--report", f"{tmp_path}/")
    assert out.splitlines()[-2:] == [f"wrote {tmp_path}/attribution.json", f"wrote {tmp_path}/attribution.png"]
    top = [line for line in out.splitlines() if line.startswith("- ")][0]
    assert re.match(r"^- MLP +L\d+", top), top  # the largest term is an MLP ...
    layer, value = int(re.search(r"L(\d+)", top).group(1)), float(top.split(":")[1].split()[0])
    (image,) = figures["attribution"].axes[0].get_images()
    assert [t.get_text() for t in image.axes.get_xticklabels()][-1] == "MLP"
    grid = np.asarray(image.get_array())
    assert grid.shape == (30, 10) and grid[layer, -1] == pytest.approx(value, abs=0.006)  # ... and it is drawn
    assert np.unravel_index(np.abs(grid).argmax(), grid.shape) == (layer, 9)

    out = run_cli("residual", "--prompt", "Why do bees buzz?", "--report", str(tmp_path))
    assert out.splitlines()[-2:] == [f"wrote {tmp_path}/residual.json", f"wrote {tmp_path}/residual.png"]
    (image,) = figures["residual"].axes[0].get_images()
    norms = np.asarray(image.get_array())
    assert isinstance(image.norm, colors.LogNorm) and norms[:, 0].max() > 100 * np.median(norms[:, 1:])
    assert np.ptp(image.norm(norms[1:, 1:])) > 0.3  # the other positions are not all one colour

    prompt = "John has 3 apples. He buys 2 more. How many apples does he have?"
    out = run_cli("cot", "--prompt", prompt, "--report", str(tmp_path))
    assert out.splitlines()[-2:] == [f"wrote {tmp_path}/cot.json", f"wrote {tmp_path}/cot.png"]
    (image,) = figures["cot"].axes[0].get_images()
    labels = [t.get_text() for t in image.axes.get_xticklabels()]
    assert [label.split("\n")[0] for label in labels] == [
        "1. John has 3 apples.", "2. He buys 2 more.", "3. How many apples does he have?"]
