"""The `view` command of the `recon-fast` program: a cube (.json, .json.gz, .npz) or an attribution
JSON (`attribute --json`, `cot --json`, `--report`'s attribution.json) as one self-contained HTML
page (recon_fast.view). Bad input is one ValueError / FileNotFoundError line, found before any
page is built."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from recon_fast.atomic_files import check_writable
from recon_fast.cube import export
from recon_fast.cube.cube import ActivityCube
from recon_fast.file_errors import FileFormatError, reading
from recon_fast.view import html as view

HTML_SUFFIXES = (".html", ".htm")


def add_parser(sub) -> None:
    p = sub.add_parser("view", help="write a self-contained HTML viewer of a cube or an attribution JSON")
    p.add_argument("path", metavar="CUBE.json|CUBE.npz|ATTRIBUTION.json",
                   help="a cube written by `trace`, or the JSON of `attribute`/`cot` (--json or --report)")
    p.add_argument("-o", "--out", default=None, help="the HTML file (default: the input's name with .html)")
    p.add_argument("--compare", metavar="OTHER", default=None,
                   help="a second cube with the same layers: shown beside the first, and their difference")
    p.add_argument("--title", default=None, help="the page's title (default: what it shows and the model)")
    p.set_defaults(run=run)


def default_output(path: str) -> str:
    """cube.json, cube.json.gz, cube.npz -> cube.html beside it."""
    name = Path(path).name
    lower = name.lower()
    stem = next((name[: -len(s)] for s in (*export.SUFFIXES, ".json") if lower.endswith(s)), Path(path).stem)
    return str(Path(path).with_name(f"{stem or name}.html"))


def read_source(path: str | os.PathLike) -> ActivityCube | dict:
    """What `recon-fast view` was given: a cube (.npz, or JSON with `layers`) or an attribution
    document (JSON). One-line errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file {str(path)!r}" if not path.exists() else f"{str(path)!r} is not a file")
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK":  # npz (a zip): ActivityCube.load names the file and its problem
        return ActivityCube.load(path)
    expected = "cube (.json, .json.gz, .npz) or attribution JSON"
    with reading(path, expected):
        try:
            document = export.read_json(path)
        except orjson.JSONDecodeError as exc:
            raise FileFormatError(path, expected, f"it does not parse as JSON ({str(exc).splitlines()[0]})") from None
    if isinstance(document, dict) and isinstance(document.get("layers"), list):
        del document
        return ActivityCube.load(path)
    if view.is_attribution(document):
        return document
    raise FileFormatError(path, expected, "it parses as JSON but is neither a cube (no `layers`) nor an "
                          "attribution JSON (no `labels` and `sequences`, or `steps`), as `recon-fast trace` / "
                          "`attribute --json` write them")


def run(args) -> int:
    out = args.out if args.out is not None else default_output(args.path)
    if not out.lower().endswith(HTML_SUFFIXES):
        raise ValueError(f"-o {out!r}: the viewer is an HTML page; name it .html")
    check_writable(out)
    if args.compare is not None and Path(args.compare).resolve() == Path(out).resolve():
        raise ValueError(f"-o {out!r} would overwrite --compare's input")
    source = read_source(args.path)
    if isinstance(source, dict):
        if args.compare is not None:
            raise ValueError("--compare goes with two cubes; the first input is an attribution JSON")
        size = view.attribution_html(source, out, title=args.title)
        what = "attribution"
    else:
        other = None
        if args.compare is not None:
            other = read_source(args.compare)
            if isinstance(other, dict):
                raise ValueError(f"--compare {args.compare!r} is an attribution JSON; it must be a cube")
            view.check_comparable(source, other)
        size = view.cube_html(source, out, compare=other, title=args.title,
                              names=(Path(args.path).name, Path(args.compare).name) if other is not None else ("A", "B"))
        what = f"{source.num_layers} layers x {source.data.shape[2]} tokens" + (" and the cube compared" if other else "")
    print(f"wrote   {out} ({what}, {size / 1e6:.2f} MB); open it in a browser, no network needed")
    return 0
