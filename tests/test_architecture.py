"""The package's shape, checked: one grammar for attribution labels (Python writes and reads them
with it, the CLI names them with it, the viewer gets it from its page); lower layers never import
upper ones, nothing imports the package __init__, no import cycles (an ast walk over recon_fast/,
imports inside functions included); both attention captures go through trace/attention_intercept;
every op is declared in csrc/ops.cpp, one CompiledOp answers which backend serves it, and the build
flags are written once (kernels/build_config.py); the old import paths warn and still give the
real objects. docs/ARCHITECTURE.md describes it."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, make_model, perturb_vectors

from recon_fast import attribution_labels as labels
from recon_fast.attribution import direct_logit_attribution
from recon_fast.cli import attribution as attribution_cli
from recon_fast.trace import attention_intercept
from recon_fast.view import html as view_html

PACKAGE = Path(__file__).resolve().parent.parent / "recon_fast"


# ---- item 1: one grammar for attribution labels ---------------------------------------------------
def example_fields(kind: labels.TermKind) -> dict[str, int]:
    return {field: 3 + 4 * k for k, field in enumerate(kind.fields)}  # distinct: a swapped field shows


@pytest.mark.parametrize("kind", labels.KINDS, ids=lambda kind: kind.name)
def test_every_label_kind_round_trips(kind):
    fields = example_fields(kind)
    label = kind.label(**fields)
    term = labels.parse_label(label)
    assert term.kind is kind and {f: getattr(term, f) for f in kind.fields} == fields
    assert all(getattr(term, f) is None for f in ("layer", "head", "source", "neuron") if f not in fields)
    if kind.fields:  # the bulk form, one field varying, names exactly what label() names
        varying = kind.fields[-1]
        fixed = {f: v for f, v in fields.items() if f != varying}
        assert kind.labels(varying, range(12), **fixed) == [kind.label(**fixed, **{varying: v}) for v in range(12)]


def test_labels_of_no_kind_and_the_per_layer_reading():
    for label in ("L1.H2.Srest", "L1.mlp.N3", "Lx.attn", "L1.H2.S", "L1.N", "mlp", "embed.0", "L1.H2.S_rest.x", ""):
        assert labels.parse_label(label) is None and labels.layer_term(label) is None, label
    assert labels.layer_term("L3.mlp") == (3, "mlp") and labels.layer_term("L3.H7") == (3, "H7")
    assert labels.layer_term("L3.H7.S5") == (3, "H7.S5") and labels.layer_term("L3.H7.S_rest") == (3, "H7.S_rest")
    assert labels.layer_term("L3.N12") == (3, "N12") and labels.layer_term("L0.attn_norm_bias") == (0, "attn_norm_bias")
    assert labels.layer_term("embed") is None and labels.layer_term("unembed_bias") is None
    cells = {kind.name: labels.parse_label(kind.label(**example_fields(kind))).cell for kind in labels.KINDS}
    assert cells["source"] == cells["source_rest"] == cells["head"] == "H7" and cells["neuron"] == cells["mlp"] == "mlp"


def test_an_attribution_writes_only_labels_of_the_grammar():
    model = perturb_vectors(make_model("gpt2", seed=3), seed=4)  # biases, a position embedding, a norm bias
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    runs = [direct_logit_attribution(model, ids), direct_logit_attribution(model, ids, per_head=True),
            direct_logit_attribution(model, ids, by_source=True, per_neuron=True, source_top_k=2)]
    kinds = {labels.parse_label(label).kind.name for run in runs for label in run.labels}  # None would fail here
    assert kinds == {"embed", "pos_embed", "attn", "mlp", "head", "attn_bias", "source", "source_rest", "neuron",
                     "mlp_bias", "norm_bias"}


def test_the_cli_names_terms_by_the_grammar():
    examples = [kind.label(**example_fields(kind)) for kind in labels.KINDS]
    names = attribution_cli.display_names(examples)
    for kind, label in zip(labels.KINDS, examples):
        term = labels.parse_label(label)
        assert names[label].split() == [kind.word] + ([term.where] if term.where else []), (label, names[label])
    assert names["L3.H7.S11"].strip() == "Head L3.H7<-11" and names["L3.mlp_bias"].strip() == "MLP  L3.b"


def test_the_figure_grid_with_the_mlp_column_is_the_results():
    model = perturb_vectors(make_model("llama", seed=6), seed=7)
    attribution = direct_logit_attribution(model, torch.arange(7), per_head=True, per_neuron=True)
    rows, columns, grid = attribution.grid_with_mlp()
    assert columns == [f"H{h}" for h in range(4)] + ["mlp"]
    for layer in range(2):
        neurons = sum(v for l, v in zip(attribution.labels, attribution.values[0].tolist())
                      if l.startswith(f"L{layer}.N"))
        assert float(grid[layer, -1]) == pytest.approx(neurons, rel=1e-12)
    figure_rows, figure_columns, figure = attribution_cli.attribution_grid(attribution)
    assert figure_columns[-1] == "MLP" and (figure == grid.numpy()).all()


def test_the_viewer_reads_labels_with_the_grammar_its_page_carries():
    document = {"labels": ["embed", "L0.H1.S_rest"], "sequences": [{"values": [1.0, 2.0]}]}
    assert view_html.attribution_payload(document)["term_kinds"] == labels.page_table()
    script = (PACKAGE / "view" / "assets" / "viewer.js").read_text()
    assert "meta.term_kinds" in script
    assert "/^L(" not in script and "S(\\d+|_rest)" not in script, "viewer.js spells a label grammar of its own"


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to run viewer.js's grammar outside a browser")
def test_the_viewers_reading_of_every_kind_is_pythons(tmp_path):
    """viewer.js's labelGrammar, run by node on page_table(): each kind's fields, cell and name."""
    script = (PACKAGE / "view" / "assets" / "viewer.js").read_text()
    start, end = script.index("  function labelGrammar(kinds)"), script.index("  // The prompt's tokens")
    examples = [kind.label(**example_fields(kind)) for kind in labels.KINDS]
    program = tmp_path / "grammar.js"
    program.write_text(
        "var shownToken = JSON.stringify;\n" + script[start:end] +
        f"var g = labelGrammar({json.dumps(labels.page_table())});\n"
        f"console.log(JSON.stringify({json.dumps(examples)}.map(function (l) {{"
        " return [g.layerTerm(l), g.hexName(l, null)]; })));\n")
    read = json.loads(subprocess.run(["node", str(program)], capture_output=True, text=True, check=True).stdout)
    for label, (term, name) in zip(examples, read):
        expected = labels.parse_label(label)
        if expected.layer is None:
            assert term is None and name == expected.kind.word, label
            continue
        fields = ("layer", "head", "source", "neuron")
        assert [term[f] for f in fields] == [-1 if getattr(expected, f) is None else getattr(expected, f)
                                             for f in fields], label
        assert term["cell"] == expected.cell and term["rest"] == (expected.kind is labels.SOURCE_REST)
        if expected.kind not in (labels.SOURCE, labels.SOURCE_REST):  # the page spells a source out
            assert name == f"{expected.kind.word} {expected.where}", label


# ---- item 4: layers and the import graph ----------------------------------------------------------
# Lowest first; a unit imports only units of lower rank. A unit is a subpackage or a top-level
# module. The viewer takes plain data (a cube through its attributes, attribution documents as
# JSON, the label grammar), so it sits below the cube, whose to_html calls it.
LAYERS = [
    {"recon_fast._version"},
    {"recon_fast.file_errors", "recon_fast.atomic_files", "recon_fast.dispatch",
     "recon_fast.model_cache", "recon_fast.attribution_labels", "recon_fast.moved_paths"},
    {"recon_fast.kernels"},
    {"recon_fast.view"},
    {"recon_fast.cube"},
    {"recon_fast.trace"},
    {"recon_fast.attribution", "recon_fast.models"},
    {"recon_fast.dataset"},
    {"recon_fast.cli"},
    {"recon_fast.ops", "recon_fast.logit_lens", "recon_fast.chain_of_thought"},  # deprecated aliases
    {"recon_fast"},  # the package __init__: imports what it exports
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
COMPILED = {"recon_fast._C"}  # the compiled library: a module, though no .py holds it


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The recon_fast modules `name` imports anywhere in its file (functions included): a
    `from X import y` names X.y where that is a module, else X."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules | COMPILED else base)
    return {target for target in found if target in modules and target != name}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_every_unit_has_a_layer(graph):
    missing = sorted({unit_of(m) for m in graph} - set(RANK))
    assert not missing, f"place {missing} in LAYERS (and in docs/ARCHITECTURE.md)"


def test_nothing_imports_the_package_init(graph):
    offenders = sorted(module for module, targets in graph.items() if "recon_fast" in targets)
    assert not offenders, f"{offenders} import the package __init__: put what they need in a module of its own"


def test_lower_layers_never_import_upper_ones(graph):
    upward = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                    if unit_of(module) != unit_of(target) and RANK[unit_of(target)] >= RANK[unit_of(module)])
    assert not upward, "imports of a layer not below: " + ", ".join(upward)


def test_the_cube_and_the_viewer_do_not_import_each_other_both_ways(graph):
    view_imports = {unit_of(t) for m, targets in graph.items() if unit_of(m) == "recon_fast.view" for t in targets}
    assert not view_imports & {"recon_fast.cube", "recon_fast.trace", "recon_fast.attribution", "recon_fast.cli"}
    kernel_imports = {unit_of(t) for m, targets in graph.items() if unit_of(m) == "recon_fast.kernels" for t in targets}
    assert "recon_fast.trace" not in kernel_imports


# Known, to be removed: cli.attribution and cli.heads import encode() and output_paths() from
# the cli package's __init__, which imports them (those two belong in a cli module of their own).
WAITING_CYCLE_EDGES: set[tuple[str, str]] = set()  # edges of a known cycle waiting for a move (none now)


def test_no_import_cycles(graph):
    """Between modules and between units (importing a module runs its package's __init__)."""
    graph = {module: {t for t in targets if (module, t) not in WAITING_CYCLE_EDGES}
             for module, targets in graph.items()}
    units = {}
    for module, targets in graph.items():
        units.setdefault(unit_of(module), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(module))
    for name, edges in (("modules", graph), ("packages", units)):
        cycle = find_cycle(edges)
        assert cycle is None, f"an import cycle between {name}: {' -> '.join(cycle)}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


# ---- item 2: one way into attention ---------------------------------------------------------------
TRANSFORMERS_ATTENTION = {"ALL_ATTENTION_FUNCTIONS", "ALL_MASK_ATTENTION_FUNCTIONS", "AttentionInterface",
                          "AttentionMaskInterface", "masking_utils", "set_attn_implementation"}


def names_in_code(path: Path) -> set[str]:
    """Every name, attribute and imported module or name in a file's code (not its strings)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            names |= {node.module or ""} | {part for alias in node.names for part in alias.name.split(".")}
            names |= set((node.module or "").split("."))
    return names


def test_only_the_intercept_module_touches_transformers_attention_dispatch(graph):
    touching = {name for name, path in package_modules().items() if names_in_code(path) & TRANSFORMERS_ATTENTION}
    assert touching == {"recon_fast.trace.attention_intercept"}, touching
    for capture in ("recon_fast.attribution.source_capture", "recon_fast.trace.attention_stats_capture"):
        assert "recon_fast.trace.attention_intercept" in graph[capture], capture


def test_both_captures_run_inside_the_intercept():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from recon_fast.attribution.source_capture import SourceCapture
    from recon_fast.trace.tracer import Tracer

    model = make_model("llama", seed=1)
    with SourceCapture({}, torch.tensor([0])):
        wrapped = {key: ALL_ATTENTION_FUNCTIONS._local_mapping[key].__module__ for key in ("sdpa", "eager")}
    assert set(wrapped.values()) == {attention_intercept.__name__}
    seen = []
    model.model.layers[0].register_forward_hook(
        lambda module, args, output: seen.append((model.config._attn_implementation, len(attention_intercept._active))))
    Tracer(model, attention="stats").run(torch.randint(1, VOCAB, (1, 6)))
    assert seen == [(attention_intercept.IMPLEMENTATION, 2)] and model.config._attn_implementation == "sdpa"


def test_one_reading_of_the_mask():
    """key_mask: None is the module's causality with the model's window; a 4-D mask is the general
    mask; the compact form masks scores as the model's own mask does."""
    module = torch.nn.Module()
    assert attention_intercept.key_mask(None, module, {"sliding_window": 3}, 8) == (True, 3, None, None, 0)
    module.is_causal = False
    assert attention_intercept.key_mask(None, module, {}, 8)[:2] == (False, None)
    padding = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    general = torch.ones(2, 1, 6, 6).tril().bool() & padding.bool()[:, None, None, :]
    general &= torch.ones(6, 6).triu(-1).bool()  # a window of 2 keys
    assert attention_intercept.key_mask(general, module, {}, 6).general is general
    scores = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    rows = torch.arange(6)
    compact = attention_intercept.KeyMask(True, 2, padding.bool(), None)
    expected = attention_intercept.KeyMask(False, None, None, general).mask_scores(scores, rows, rows)
    assert torch.equal(compact.mask_scores(scores, rows, rows), expected)


# ---- item 3: kernels/, each op declared once, one backend query, one build configuration ----------
CSRC = PACKAGE.parent / "csrc"


def _csrc_files() -> list[Path]:
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh"))


def test_every_op_is_declared_in_ops_cpp_and_implemented_there_by_name():
    import re

    declared = set(re.findall(r'm\.def\(\s*"(\w+)\(', (CSRC / "ops.cpp").read_text()))
    assert {"token_stats", "token_stats_rows", "token_stats_rows_grouped", "attention_stats", "cpu_kernel"} <= declared
    implemented = set()
    for path in _csrc_files():
        text = path.read_text()
        if path.name != "ops.cpp":
            for macro in ("TORCH_LIBRARY(", "TORCH_LIBRARY_FRAGMENT("):
                assert macro not in text, f"{path.relative_to(CSRC)} declares ops ({macro}): declare them in ops.cpp"
            assert not re.search(r'm\.def\(\s*"\w+\(', text), f"{path.relative_to(CSRC)} defines an op schema"
        implemented |= set(re.findall(r'm\.impl\(\s*"(\w+)"', text))
    assert implemented == declared, f"declared but never implemented: {declared - implemented}; " \
                                    f"implemented but not declared: {implemented - declared}"


def test_one_backend_query_for_every_op():
    import torch

    from recon_fast.kernels import _library, attention_stats, token_stats

    built = _library.module is not None
    cuda = built and torch._C._dispatch_has_kernel_for_dispatch_key("recon_fast::token_stats", "CUDA")
    for face in (token_stats, attention_stats):
        assert isinstance(face._COMPILED, _library.CompiledOp)
        assert face.backend("cpu") == ("cpp" if built else "torch")
        assert face.backend("cuda") == ("cuda" if cuda else "torch")
        assert face.backend("meta") == "torch"  # no kernel: the fallback
        assert not face._COMPILED.serves("meta") and face._COMPILED.serves("cpu") == built
    for path in PACKAGE.rglob("*.py"):  # the dispatch keys and the dispatcher query live in _library.py alone
        if path.name != "_library.py":
            text = path.read_text()
            assert "_KERNEL_DEVICES" not in text and "_dispatch_has_kernel_for_dispatch_key" not in text, path


def test_an_op_on_a_device_without_kernels_takes_the_fallback():
    """A meta tensor (shape propagation) once asked the dispatcher for a "META" key and failed."""
    import warnings

    import torch

    from recon_fast.kernels.token_stats import NUM_STATS, token_stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback says once that it is the fallback
        out = token_stats(torch.empty(2, 3, 8, device="meta"))
    assert out.shape == (2, 3, NUM_STATS) and out.device.type == "meta"


def test_the_build_configuration_is_written_once_and_loads_without_torch():
    import sys

    for path in (PACKAGE.parent / "setup.py", PACKAGE / "kernels" / "_library.py"):
        text = path.read_text()
        for copy in ('"-O3"', '"-fopenmp"', ".glob(", "RECON_FAST_WITH_CUDA"):
            assert copy not in text, f"{path.name} writes {copy}: it belongs in kernels/build_config.py"
        assert "build_config" in text, path
    # setup.py loads it by path, before the package (or torch's extension machinery) can be imported.
    script = ("import importlib.util, sys; sys.modules['torch'] = None; sys.modules['recon_fast'] = None; "
              f"spec = importlib.util.spec_from_file_location('bc', {str(PACKAGE / 'kernels' / 'build_config.py')!r}); "
              "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
              "print(m.compile_args(True)['cxx'], len(m.sources(True)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "RECON_FAST_WITH_CUDA" in done.stdout


# ---- the deprecated aliases -----------------------------------------------------------------------
ALIASES = {"recon_fast.ops": "recon_fast.kernels.token_stats",
           "recon_fast.kernels.ops": "recon_fast.kernels.token_stats",
           "recon_fast.logit_lens": "recon_fast.attribution.logit_lens",
           "recon_fast.chain_of_thought": "recon_fast.attribution.chain_of_thought"}


@pytest.mark.parametrize("alias", ALIASES)
def test_old_import_paths_warn_and_give_the_real_objects(alias):
    import importlib

    shim, real = importlib.import_module(alias), importlib.import_module(ALIASES[alias])
    assert shim.__all__ and sorted(dir(shim)) == sorted(shim.__all__)
    for name in shim.__all__:
        with pytest.warns(DeprecationWarning, match=f"import it from {ALIASES[alias]}"):
            assert getattr(shim, name) is getattr(real, name)
    with pytest.raises(AttributeError), warnings.catch_warnings():
        warnings.simplefilter("error")
        shim.no_such_name


def test_the_readmes_old_from_import_still_works_with_a_warning():
    with pytest.warns(DeprecationWarning, match="recon_fast.attribution.logit_lens"):
        from recon_fast.logit_lens import logit_lens
    from recon_fast.attribution.logit_lens import logit_lens as real
    assert logit_lens is real


def test_the_architecture_page_names_every_unit():
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    for unit in sorted(RANK):
        if unit != "recon_fast":
            assert unit.split(".", 1)[1] in text, unit
