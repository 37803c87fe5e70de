"""The command line's shared options (recon_fast.cli.options): every prompt-taking command has the
same prompt, model and output options; counts are spelled --top-k-style with the old spellings
still working; an unknown option is named with a suggestion; a load is one line on stderr with no
carriage return in a pipe; what needs no model is checked before the model loads."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recon_fast import ActivityCube, cli
from recon_fast.cli import loading, options

from test_cli import model_folder  # noqa: F401  (a tiny Llama folder, saved once per module)

PROMPT_COMMANDS = ("trace", "heads", "attribute", "cot", "residual")
ROOT = Path(__file__).resolve().parent.parent


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_every_prompt_command_has_every_shared_option_with_help():
    commands = subcommands()
    for name in PROMPT_COMMANDS:
        assert name in commands, name
    for name, parser in commands.items():
        have = option_strings(parser)
        if "--prompt" in have or name in PROMPT_COMMANDS:
            missing = set(options.SHARED_OPTIONS) - have
            assert not missing, f"`{name}` lacks {sorted(missing)}"
        if "--model" in have:  # a model command that takes no prompt (trace-dataset) still has the model options
            missing = set(options.MODEL_OPTIONS) - have
            assert not missing, f"`{name}` lacks {sorted(missing)}"
        for action in parser._actions:
            if action.option_strings and action.help is not argparse.SUPPRESS:
                assert action.help, f"`{name} {action.option_strings[0]}` has no help"


def test_counts_are_spelled_top_k_and_the_old_spellings_still_work():
    commands = subcommands()
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, options._Count) and action.help is not argparse.SUPPRESS:
                flag = action.option_strings[0]
                assert flag.startswith("--top-k") or flag == "--max-positions", f"`{name} {flag}`"
    parse = cli.build_parser().parse_args
    assert parse(["trace", "--prompt", "x", "--rows", "3"]).top_k == 3
    assert parse(["trace", "--prompt", "x"]).top_k == 12
    assert parse(["residual", "--prompt", "x", "--lens-k", "4"]).top_k == 4
    attribute = parse(["attribute", "--prompt", "x", "--neurons", "3", "--sources", "2", "--top-k-attribution", "5"])
    assert (attribute.top_k_neurons, attribute.top_k_sources, attribute.top_k) == (3, 2, 5)
    assert parse(["attribute", "--prompt", "x", "--top-k-neurons", "7"]).top_k_neurons == 7
    help_text = commands["attribute"].format_help()
    assert "--top-k-neurons" in help_text and "--neurons" not in help_text.replace("--top-k-neurons", "")


@pytest.mark.parametrize("argv, words", [
    (["trace", "--promt", "hi"], "unknown option --promt (did you mean --prompt?)"),
    (["attribute", "--prompt", "hi", "--top_k", "3"], "unknown option --top_k (did you mean --top-k?)"),
    (["residual", "--prompt", "hi", "--zzzz"], "unknown option --zzzz"),
    (["heads", "--prompt", "hi", "--jsn"], "unknown option --jsn (did you mean --json?)"),
])
def test_an_unknown_option_is_named_with_a_suggestion(argv, words, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert "required" not in err[0]


def test_abbreviations_and_negative_numbers_are_not_unknown_options():
    args = cli.build_parser().parse_args(["attribute", "--prompt", "x", "--token-i", "-2", "--per-h"])
    assert (args.prompt, args.position, args.per_head) == ("x", -2, True)


# ---- the load ------------------------------------------------------------------------------------
@pytest.fixture
def loads(monkeypatch):
    calls = []
    real = loading.load_model

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", counting)
    return calls


def test_a_load_through_a_pipe_is_one_line_without_carriage_returns(model_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "recon_fast.cli", "trace", "--model", model_folder, "--prompt",
                          "t5 t9", "--out", str(tmp_path / "cube.json"), "--layers", "residual"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr and "\r" not in run.stdout
    lines = run.stderr.strip().splitlines()
    assert any(line.startswith(f"model {model_folder} loaded in ") and line.endswith(" s since start") for line in lines), lines


@pytest.mark.parametrize("command", ["heads", "residual", "attribute", "cot"])
def test_every_model_command_says_how_long_the_load_took(command, model_folder, capsys):
    assert cli.main([command, "--model", model_folder, "--prompt", "t5 t9 t2"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"model {model_folder} loaded in " in err and "\r" not in err


def test_progress_bars_are_off_inside_the_load_unless_verbose():
    from tqdm.auto import tqdm

    shown = io.StringIO()
    with loading.progress_bars_off():
        for _ in tqdm(range(3), file=shown, desc="Converting"):
            pass
    assert shown.getvalue() == ""
    for _ in tqdm(range(3), file=shown, desc="Converting"):  # outside: tqdm is as it was
        pass
    assert "Converting" in shown.getvalue()


def test_device_map_reaches_load_model(model_folder, loads, tmp_path, capsys):
    code = cli.main(["trace", "--model", model_folder, "--prompt", "t5 t9", "--device-map", '{"": "cpu"}',
                     "--out", str(tmp_path / "c.json"), "--layers", "residual"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert loads[0]["device_map"] == {"": "cpu"} and loads[0]["device"] is None
    # the split in one line, after the load's own line (which also counts the imports before it)
    lines = err.strip().splitlines()
    loaded = next(i for i, line in enumerate(lines) if line.startswith(f"model {model_folder} loaded in "))
    assert lines[loaded].endswith(" s since start") and lines[loaded + 1] == "device map: all on cpu", lines


def test_no_device_map_no_split_line(model_folder, loads, tmp_path, capsys):
    assert cli.main(["trace", "--model", model_folder, "--prompt", "t5 t9", "--out", str(tmp_path / "c.json"),
                     "--layers", "residual"]) == 0
    assert "device map:" not in capsys.readouterr().err


# ---- checked before the load ---------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["trace", "--layers", r"nonexistent\.thing"], r"no module name matches 'nonexistent\.thing'"),
    (["trace-dataset", "--data", "{tmp}/docs.txt", "--out", "{tmp}/out", "--layers", r"model\.nope"],
     r"'model\.nope'"),
    (["attribute", "--target", " Paris", "--versus", " Paris"], "same token"),
    (["attribute", "--target", "12", "--versus", "12"], "same token"),
    (["attribute", "--top-k", "0"], "--top-k must be at least 1"),
    (["attribute", "--neurons", "-1"], "--neurons must be at least 0"),
    (["residual", "--max-positions", "0"], "--max-positions must be at least 1"),
    (["heads", "--top-k", "0"], "--top-k must be at least 1"),
    (["cot", "-o", "{tmp}/cot.txt"], "name the file .json"),
    (["residual", "--prompt-file", "{tmp}/missing.txt"], "missing.txt"),
    (["heads", "--device", "cpu", "--device-map", "auto"], "not both"),
    (["attribute", "--device-map", "{{oops"], "not a JSON object"),
    (["cot", "--chat"], "--chat"),
])
def test_what_needs_no_model_is_refused_before_the_load(argv, words, model_folder, loads, tmp_path, capsys):
    (tmp_path / "docs.txt").write_text("t5 t9\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if argv[0] != "trace-dataset" and "--prompt-file" not in argv:
        argv += ["--prompt", "t5 t9"]
    code = cli.main([*argv, "--model", model_folder])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert words in err[0], err[0]
    assert " in full" not in err[0] and "\\\\" not in err[0]  # the pattern as typed, not its repr
    assert loads == [], f"the model was loaded before {err[0]!r}"
    assert not any("loaded in" in line for line in err)


def test_the_default_models_names_come_from_its_cache_folder_when_there_is_one(model_folder, monkeypatch):
    from recon_fast.cli import checks

    monkeypatch.setattr(checks, "_default_model_cache", lambda: None)  # before the first load: no names at hand
    checks.check_layers(r"nonexistent\.thing", "smollm2")  # left to the Tracer after the load
    assert checks.model_skeleton("smollm2") is None
    monkeypatch.setattr(checks, "_default_model_cache", lambda: Path(model_folder))  # a converted folder
    checks.check_layers(r"model\.layers\.\d+", "smollm2")
    with pytest.raises(ValueError, match=r"--layers: no module name matches 'nonexistent\\.thing'"):
        checks.check_layers(r"nonexistent\.thing", "smollm2")
    skeleton = checks.model_skeleton("smollm2")
    assert next(skeleton.parameters()).is_meta and "lm_head" in dict(skeleton.named_modules())


# ---- the shared output options -------------------------------------------------------------------
def test_prompt_file_json_and_out_work_in_every_prompt_command(model_folder, loads, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t5 t9 t2\n\nt7 t3\n")
    for command in ("attribute", "residual", "heads"):
        out = tmp_path / f"{command}.json"
        assert cli.main([command, "--model", model_folder, "--prompt-file", str(prompts), "-o", str(out),
                         "--json"]) == 0, capsys.readouterr().err
        printed = json.loads(capsys.readouterr().out)
        assert [d["prompt"] for d in printed] == ["t5 t9 t2", "t7 t3"], command
        written = [json.loads((tmp_path / f"{command}-{n}.json").read_text()) for n in (1, 2)]
        assert written == printed, command
    assert len(loads) == 3  # one load per command, whatever the number of prompts


def test_trace_json_summarises_what_the_table_shows(model_folder, tmp_path, capsys):
    out = tmp_path / "cube.npz"
    assert cli.main(["trace", "--model", model_folder, "--prompt", "t5 t9 t2", "-o", str(out), "--json",
                     "--layers", "residual", "--top-k", "2"]) == 0
    document = json.loads(capsys.readouterr().out)
    cube = ActivityCube.load(out)
    (result,) = document["prompts"]
    assert result["tokens"] == 3 and result["layers"] == cube.num_layers and result["out"] == str(out)
    energy = cube.metric("energy")[:, 0]  # [layers, tokens]
    peaks = sorted(((float(energy[i].max()), name) for i, name in enumerate(cube.layer_names)), reverse=True)[:2]
    assert [(r["layer"], round(r["peak_energy"], 4)) for r in result["peak_energy"]] == \
        [(name, round(peak, 4)) for peak, name in peaks]


def test_the_forward_bar_is_drawn_only_on_a_terminal(monkeypatch):
    import recon_fast.cli as cli_package

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log
    assert cli_package._progress(10, True, "forward") is None
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = cli_package._progress(10, True, "forward")
    assert bar is not None
    bar.close()
