"""Chain-of-thought attribution: a prompt is split into steps, and the last token of every step
is attributed (recon_fast.attribution) from one forward pass over the whole prompt: in a causal
model the prefix up to a step's end holds exactly the state a separate run on that prefix would."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from recon_fast.attribution.direct import attribute_positions
from recon_fast.attribution.result import Attribution

# Explicit step markers: "Step 3:" anywhere, or "1." / "2)" opening a line.
STEP_MARKER = re.compile(r"\bstep\s*\d+\s*[:.)]|^[ \t]*\d+[.)][ \t]", re.IGNORECASE | re.MULTILINE)
# A sentence ends at . ! ? (repeated, as in "...") followed by white space or the end of the text.
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


@dataclass
class CotStep:
    number: int
    text: str
    span: tuple[int, int]  # characters [start, end) of the prompt
    token_index: int  # the step's last token: the position attributed
    attribution: Attribution


def split_steps(text: str) -> list[tuple[int, int]]:
    """Character spans of the steps. Explicit structure wins: when the text has step markers
    ("Step 2:", a line opening with "2." or "2)") or several lines, a step starts at every marker
    and every line; otherwise each sentence is a step (HexRay's rule)."""
    markers = [m.start() for m in STEP_MARKER.finditer(text)]
    lines = [m.end() for m in re.finditer(r"\n", text)]
    if markers or len([line for line in text.splitlines() if line.strip()]) > 1:
        cuts = sorted({0, len(text), *markers, *lines})
    else:
        cuts = [0] + [m.end() for m in SENTENCE_END.finditer(text)] + [len(text)]
    spans = []
    for start, end in zip(cuts, cuts[1:]):
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
    return spans


def step_token_indices(tokenizer, text: str, spans: list[tuple[int, int]], input_ids: list[int]) -> list[int]:
    """The index of the token holding each span's last character."""
    encoded = tokenizer(text, return_offsets_mapping=True) if tokenizer.is_fast else None
    if encoded is not None and list(encoded["input_ids"]) == list(input_ids):
        offsets = encoded["offset_mapping"]
        real = [i for i, (a, b) in enumerate(offsets) if b > a]  # special tokens have empty spans
        return [max(i for i in real if offsets[i][0] < end) for _, end in spans]
    # Without offsets: the length of the tokenized prefix (exact unless a token straddles the end).
    return [len(tokenizer(text[:end])["input_ids"]) - 1 for _, end in spans]


def chain_of_thought(model: nn.Module, tokenizer, prompt: str, per_head: bool = False) -> list[CotStep]:
    """Attribution of every step's last token (its predicted next token), one forward pass."""
    spans = split_steps(prompt)
    if not spans:
        raise ValueError("the prompt is empty: nothing to split into steps")
    inputs = tokenizer(prompt, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    indices = step_token_indices(tokenizer, prompt, spans, ids)
    attributions = attribute_positions(model, inputs, indices, per_head=per_head, tokenizer=tokenizer)
    return [CotStep(number=n + 1, text=prompt[a:b], span=(a, b), token_index=i, attribution=attr)
            for n, ((a, b), i, attr) in enumerate(zip(spans, indices, attributions))]


def steps_to_dict(steps: list[CotStep]) -> list[dict]:
    return [{"step": s.number, "text": s.text, "span": list(s.span), "token_index": s.token_index,
             "attribution": s.attribution.to_dict()} for s in steps]
