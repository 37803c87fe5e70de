"""The `view` command of the `recon-fast` program: a cube (.json, .json.gz, .npz) or an attribution
JSON (`attribute --json`, `cot --json`, `--report`'s attribution.json) as one self-contained HTML
page (recon_fast.view). Bad input is one ValueError / FileNotFoundError line, found before any
page is built."""

from __future__ import annotations

from pathlib import Path

from recon_fast.cube import export

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


def run(args) -> int:
    from recon_fast.view import html as view

    out = args.out if args.out is not None else default_output(args.path)
    if not out.lower().endswith(HTML_SUFFIXES):
        raise ValueError(f"-o {out!r}: the viewer is an HTML page; name it .html")
    export.check_writable(out)
    if args.compare is not None and Path(args.compare).resolve() == Path(out).resolve():
        raise ValueError(f"-o {out!r} would overwrite --compare's input")
    source = view.read_source(args.path)
    if isinstance(source, dict):
        if args.compare is not None:
            raise ValueError("--compare goes with two cubes; the first input is an attribution JSON")
        size = view.attribution_html(source, out, title=args.title)
        what = "attribution"
    else:
        other = None
        if args.compare is not None:
            other = view.read_source(args.compare)
            if isinstance(other, dict):
                raise ValueError(f"--compare {args.compare!r} is an attribution JSON; it must be a cube")
            view.check_comparable(source, other)
        size = view.cube_html(source, out, compare=other, title=args.title,
                              names=(Path(args.path).name, Path(args.compare).name) if other is not None else ("A", "B"))
        what = f"{source.num_layers} layers x {source.data.shape[2]} tokens" + (" and the cube compared" if other else "")
    print(f"wrote   {out} ({what}, {size / 1e6:.2f} MB); open it in a browser, no network needed")
    return 0
