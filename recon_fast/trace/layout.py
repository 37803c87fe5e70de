"""From a run's records to its Layout, once after the pass: the length of each token axis, the hook
calls grouped into the cube's layers and placed on their token axis (or listed in meta["skipped"]
when an activation is not [batch, tokens]), the tokens as text, the padding and each layer's extra
keys. Every capture builds its part of the cube from the Layout."""

from __future__ import annotations

import numpy as np
import torch

from recon_fast.trace.model_inputs import ModelCall, token_texts
from recon_fast.trace.session import Call, Layer, Layout, Session


def run_layout(session: Session, call: ModelCall, mode: str, *, tokenizer, encoder_decoder: bool,
               sequences: torch.Tensor | None = None, output=None, cache: LayerCache | None = None) -> Layout:
    """The Layout of one run ("forward" or "generate"; sequences: generate()'s [batch, positions]
    ids; output: what the model returned; cache: the layers of the Tracer's run before)."""
    batch = call.batch
    lengths = axis_lengths(session, call, mode, sequences, encoder_decoder)
    tokens, decoder_tokens = axis_texts(tokenizer, call, lengths, mode, sequences, encoder_decoder)
    exact, two_axes = call.ids is not None, decoder_tokens is not None
    if cache is None:
        layers, shape_skipped = cube_layers(session, batch, lengths, mode, exact)
        extras, memo = layer_extras(layers, two_axes), {}
    else:
        layers, shape_skipped, extras, memo = cache.layers(session, batch, lengths, mode, exact, two_axes)
    padding = padding_of(call.kwargs.get("attention_mask"), batch, lengths["tokens"]) if call.ids is not None else None
    return Layout(mode, batch, lengths, padding, layers, extras, output, tokens, decoder_tokens,
                  unique_skipped(session.skipped + shape_skipped), memo)


class LayerCache:
    """The cube layers of a Tracer's last run, reused by a run whose hook calls were the same
    (module, shape, rows in the arena, token axis, pass), as the session's logs (the C++ recorder,
    compiled_capture.CompiledLog) tell without making a Call: on the host-bound proxy of benchmarks/bench_hook_path.py (365 hooks), making the
    Calls and grouping them into layers cost ~5% of the pass. A run without the C++ recorder's log
    (session.logged false), or with another batch, axis lengths, passes or mode, works them out
    again."""

    def __init__(self):
        self._log = None  # the C++ recorder of the run the layers are of
        self._key: tuple | None = None
        self._value: tuple[list[Layer], list[dict], dict[int, dict], dict] | None = None

    def layers(self, session: Session, batch: int, lengths: dict[str, int], mode: str, exact: bool,
               two_axes: bool) -> tuple[list[Layer], list[dict], dict[int, dict], dict]:
        """(layers, their skipped entries, their extras, Layout.memo) as cube_layers and
        layer_extras give them; the memo is the one of the runs whose layers these are."""
        key = (batch, tuple(lengths.items()), tuple(session.steps), mode, exact, two_axes)
        logged = session.logged  # read before cube_layers makes the calls
        if logged and key == self._key and type(session.log) is type(self._log) and session.log.same_calls(self._log):
            layers, skipped, extras, memo = self._value
        else:
            layers, skipped = cube_layers(session, batch, lengths, mode, exact)
            extras, memo = layer_extras(layers, two_axes), {}
            self._log, self._key, self._value = ((session.log, key, (layers, skipped, extras, memo)) if logged
                                                 else (None, None, None))
        # Copies of what a cube keeps (its layer_extras, meta["skipped"]): one cube's never changes another's.
        extras = {i: {k: list(v) if isinstance(v, list) else v for k, v in extra.items()} for i, extra in extras.items()}
        return layers, [dict(s) for s in skipped], extras, memo


def axis_lengths(session: Session, call: ModelCall, mode: str, sequences: torch.Tensor | None,
                 encoder_decoder: bool) -> dict[str, int]:
    """Length of each token axis of the cube ("tokens", and an encoder-decoder's "decoder_tokens")."""
    if call.ids is None:  # positions: the longest activation
        counts = [tokens_of(c.lead_shape, call.batch) or 0 for c in session.calls]
        return {"tokens": max(counts, default=0)}
    lengths = {"tokens": call.ids.shape[1]}
    stepped = "decoder_tokens" if encoder_decoder else "tokens"
    if mode == "generate" and session.steps:
        # the positions fed through the model; the last generated token never is
        lengths[stepped] = min(sum(session.steps), sequences.shape[1])
    elif call.decoder_ids is not None:
        lengths["decoder_tokens"] = call.decoder_ids.shape[1]
    elif session.axis == "decoder_tokens" and any(c.axis == "decoder_tokens" for c in session.calls):
        # decoder ids made from labels (session.axis tells whether a decoder ran at all)
        lengths["decoder_tokens"] = max(tokens_of(c.lead_shape, call.batch) or 0
                                        for c in session.calls if c.axis == "decoder_tokens")
    return lengths


def cube_layers(session: Session, batch: int, lengths: dict[str, int], mode: str,
                exact: bool) -> tuple[list[Layer], list[dict]]:
    """The hook calls grouped into cube layers, their rows placed on their token axis; and the
    skipped entries of those whose activation does not lie on it (exact: a layer must cover its
    whole axis, as with token ids)."""
    if mode == "forward":
        return forward_layers(session.calls, batch, lengths, exact)
    # generate: a module's calls, in order, extend its token axis
    by_key: dict[tuple[str, str], list[Call]] = {}
    for call in session.calls:
        by_key.setdefault((call.name, call.axis), []).append(call)
    ends = np.cumsum(session.steps).tolist()  # where each generate() pass ends
    layers, skipped = [], []
    for calls in by_key.values():
        name, axis = calls[0].name, calls[0].axis
        counts = [tokens_of(c.lead_shape, batch) for c in calls]
        length = lengths.get(axis, 0)
        starts, placed = [], 0
        for call, n in zip(calls, counts):
            if n is None:
                break
            # A pass's rows end where the pass ends: lm_head under generate() sees only each
            # pass's last position (logits_to_keep=1).
            start = ends[call.step] - n if 0 <= call.step < len(ends) else placed
            starts.append(start)
            placed = start + n
        if None in counts or any(s < 0 for s in starts) or placed > length:
            shapes = sorted({c.lead_shape for c in calls})
            skipped.append(shape_skipped(name, shapes[0], batch, axis, length))
            continue
        layers.append(Layer(name, axis, calls, starts, counts))
    return layers, skipped


def forward_layers(calls: list[Call], batch: int, lengths: dict[str, int],
                   exact: bool) -> tuple[list[Layer], list[dict]]:
    """run(): each hook call is a layer, its rows from the start of its token axis. A loop of
    its own, as it runs once per hook call after every run."""
    layers, skipped = [], []
    for call in calls:
        lead = call.lead_shape
        n = lead[1] if len(lead) == 2 and lead[0] == batch else tokens_of(lead, batch)  # the usual case first
        axis = call.axis
        if axis == "decoder_tokens" and n not in (None, lengths[axis]) and n == lengths["tokens"]:
            axis = "tokens"  # a decoder's cross-attention keys/values are on the encoder's axis
        length = lengths.get(axis, 0)
        if n is None or n > length or (exact and n != length):
            skipped.append(shape_skipped(call.name, call.lead_shape, batch, axis, length))
            continue
        layers.append(Layer(call.name, axis, [call], [0], [n]))
    return layers, skipped


def tokens_of(lead: tuple[int, ...], batch: int) -> int | None:
    """The positions of an activation whose leading dims are `lead`, or None where they are not
    [batch, positions]."""
    if len(lead) == 2 and lead[0] in (batch, 1):  # [1, T] broadcasts over the batch (e.g. wpe)
        return lead[1]
    if len(lead) == 1 and batch == 1:  # a [T, D] activation of a single sequence
        return lead[0]
    return None


def shape_skipped(name: str, lead: tuple[int, ...], batch: int, axis: str, length: int) -> dict:
    """meta["skipped"]'s entry for a layer whose activation does not lie on its token axis."""
    where = f"{axis}={length}" if length else axis
    return {"layer_name": name, "reason": f"activation leading shape {lead} is not [batch={batch}, {where}]"}


def axis_texts(tokenizer, call: ModelCall, lengths: dict[str, int], mode: str, sequences: torch.Tensor | None,
               encoder_decoder: bool) -> tuple[list[list[str]], list[list[str]] | None]:
    """(tokens, decoder_tokens) as text, [batch][positions] each: decoded ids, or positions for
    inputs that are not ids; decoder_tokens None without a decoder axis."""
    batch = call.batch
    if call.ids is None:
        return [[str(i) for i in range(lengths["tokens"])] for _ in range(batch)], None
    source = sequences if mode == "generate" and not encoder_decoder else call.ids
    tokens = token_texts(tokenizer, source[:, :lengths["tokens"]].tolist())
    if "decoder_tokens" not in lengths:
        return tokens, None
    decoder = sequences if mode == "generate" else call.decoder_ids
    if decoder is None:  # decoder ids the model made itself (from labels): positions
        return tokens, [[str(i) for i in range(lengths["decoder_tokens"])] for _ in range(batch)]
    return tokens, token_texts(tokenizer, decoder[:, :lengths["decoder_tokens"]].tolist())


def padding_of(attention_mask: torch.Tensor | None, batch: int, length: int) -> np.ndarray | None:
    """[batch, length] True at padding, from a [batch, T] attention mask; None without padding."""
    if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
        return None
    mask = attention_mask.detach().to("cpu", torch.bool)
    if mask.shape[1] < length:  # generate(): generated positions are real tokens
        mask = torch.cat([mask, mask.new_ones(batch, length - mask.shape[1])], dim=1)
    padding = ~mask[:, :length].numpy()
    return padding if padding.any() else None


def layer_extras(layers: list[Layer], two_axes: bool) -> dict[int, dict]:
    """Per layer index, the keys its JSON object adds: its token axis (with two axes) and the shape
    of features folded into one row; layers with neither have no entry."""
    extras = {}
    for i, layer in enumerate(layers):
        feature_shape = layer.calls[0].feature_shape
        if two_axes or feature_shape is not None:
            extra = {"token_axis": layer.axis} if two_axes else {}
            if feature_shape is not None:
                extra["feature_shape"] = feature_shape
            extras[i] = extra
    return extras


def unique_skipped(skipped: list[dict]) -> list[dict]:
    """Skipped entries, each (module, reason) once, in the order first seen."""
    seen, unique = set(), []
    for item in skipped:
        key = (item["layer_name"], item["reason"])
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique
