"""The options every command shares, defined once: the prompt (--prompt, --prompt-file,
--whole-file, --chat), the model (--model, --device, --device-map, --dtype, --verbose) and the
output (--json, -o/--out); counts spelled `--top-k`-style (older spellings stay as hidden aliases);
and unknown options named with the closest known one, before argparse's own required checks
(which would otherwise report `--promt hi` as a missing --prompt)."""

from __future__ import annotations

import argparse
import difflib
import json

from recon_fast.models import DEFAULT_MODEL

PROMPT_OPTIONS = ("--prompt", "--prompt-file", "--whole-file", "--chat")
MODEL_OPTIONS = ("--model", "--device", "--device-map", "--dtype", "--verbose")
OUTPUT_OPTIONS = ("--json", "--out", "-o")
SHARED_OPTIONS = PROMPT_OPTIONS + MODEL_OPTIONS + OUTPUT_OPTIONS


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the usage block first), and an
    unknown option is named (with a suggestion) before any other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and self._subparsers is None:  # a command's own parser: it sees all its options
            unknown = unknown_option(args, list(self._option_string_actions))
            if unknown is not None:
                self.error(unknown)
        return super().parse_known_args(args, namespace)


def unknown_option(argv: list[str], known: list[str]) -> str | None:
    """"unknown option --promt (did you mean --prompt?)" for the first option of argv that is
    neither one of `known` nor a prefix of one (argparse's abbreviations; it reports an ambiguous
    one itself), else None."""
    for token in argv:
        if token == "--":
            break
        if not token.startswith("-") or token == "-" or _is_number(token):
            continue
        name = token.split("=", 1)[0]
        if name in known or (name.startswith("--") and any(k.startswith(name) for k in known)):
            continue
        close = difflib.get_close_matches(name, [k for k in known if k.startswith("--")], n=1, cutoff=0.6)
        return f"unknown option {name}" + (f" (did you mean {close[0]}?)" if close else "")
    return None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to run through the model")
    source.add_argument("--prompt-file", metavar="FILE",
                        help="one prompt per non-blank line, all on one model load (several prompts: numbered "
                             "outputs, cube-1.json, cube-2.json, ...)")
    parser.add_argument("--whole-file", action="store_true", help="with --prompt-file: the whole file is one prompt")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template "
                        "(a user turn, then the assistant's turn begins), for instruct models")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="local HF folder, .gguf file or cached hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="spread the model over devices with accelerate: auto, balanced, sequential, or JSON "
                             "{module: device} (instead of --device; default: none)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the model's)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own progress bars while loading (default: one line, "
                             "'model NAME loaded in N s')")


def add_output_options(parser: argparse.ArgumentParser, out_help: str, out_default: str | None = None) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of text")
    parser.add_argument("-o", "--out", default=out_default, metavar="FILE", help=out_help)


def add_shared_options(parser: argparse.ArgumentParser, out_help: str, out_default: str | None = None) -> None:
    """Everything a prompt-taking command shares (SHARED_OPTIONS)."""
    add_prompt_options(parser)
    add_model_options(parser)
    add_output_options(parser, out_help, out_default)


class _Count(argparse.Action):
    """Stores an int count and the spelling it was given under, so that an error names the flag
    the user typed (`--rows -1` says --rows, not --top-k)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option_string)


def add_count(parser: argparse.ArgumentParser, flag: str, *, default: int, help: str, aliases: tuple[str, ...] = (),
              minimum: int = 1, dest: str | None = None, metavar: str = "K") -> None:
    """A count option `--top-k`-style; `aliases` (older spellings) still work but are not listed.
    The minimum is remembered on the parser: check_counts tests it before the model loads."""
    dest = dest or flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, dest=dest, type=int, default=default, metavar=metavar, action=_Count,
                        help=f"{help} (default: {default})")
    for alias in aliases:
        parser.add_argument(alias, dest=dest, type=int, action=_Count, help=argparse.SUPPRESS)
    counts = parser.get_default("counts") or ()
    parser.set_defaults(counts=(*counts, (flag, dest, minimum)))


def check_counts(args) -> None:
    """Every count of the command at least its minimum (a one-line ValueError otherwise)."""
    for flag, dest, minimum in getattr(args, "counts", ()):
        value = getattr(args, dest)
        if value < minimum:
            flag = getattr(args, f"{dest}_flag", None) or flag
            raise ValueError(f"{flag} must be at least {minimum}, got {value}")


def device_map(text: str | None):
    """--device-map as load_model takes it: a strategy name, or a JSON object {module: device}."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--device-map {text!r}: not a JSON object ({exc.msg})") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"--device-map {text!r}: give a JSON object {{module: device}}")
    return mapping
