"""Documents into batches, and batches onto ranks, the same way on every run.

Documents are tokenized a window at a time; within a window they are sorted by length and packed
greedily so that a batch's padded size (documents x its longest) stays within `batch_tokens`, so
padding stays small. Whole batches then go to ranks, each to the rank with the least padded
tokens so far (ties to the lowest rank): every rank walks the same plan and keeps its own batches,
so no rank needs to talk to another to know its share, a run on N ranks computes exactly the
batches a single process would, and a restarted rank finds the same batches and shards again.
Memory is one window of token ids, whatever the dataset's size."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Document:
    doc_id: int  # position among the source's documents, 0-based
    row: int  # the source's own row (line number, Parquet row, file index, item index)
    ids: np.ndarray  # [tokens] int64, at most max_tokens
    text_sha256: str


@dataclass(frozen=True)
class Batch:
    docs: tuple[Document, ...]

    @property
    def length(self) -> int:  # the padded length: the longest document
        return max(len(d.ids) for d in self.docs)

    @property
    def padded_tokens(self) -> int:
        return len(self.docs) * self.length

    @property
    def tokens(self) -> int:
        return sum(len(d.ids) for d in self.docs)

    def input_ids(self, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """[batch, length] ids and attention mask, padded on the right: a causal model's real
        positions then never see the padding."""
        ids = np.full((len(self.docs), self.length), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, d in enumerate(self.docs):
            ids[i, : len(d.ids)] = d.ids
            mask[i, : len(d.ids)] = 1
        return ids, mask


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenized_windows(documents: Iterable[tuple[int, str]], tokenizer, max_tokens: int | None,
                      window: int, skipped: list[int] | None = None,
                      truncated: list[int] | None = None) -> Iterator[list[Document]]:
    """Windows of `window` documents, tokenized (special tokens as the tokenizer adds them,
    truncated to max_tokens; the rows of those cut appended to `truncated`). Documents with no
    token are left out and their rows appended to `skipped`; they still take a doc_id, so ids
    stay tied to the source's order."""
    pending: list[tuple[int, int, str]] = []
    doc_id = 0
    for row, text in documents:
        pending.append((doc_id, row, text))
        doc_id += 1
        if len(pending) == window:
            yield _tokenize(pending, tokenizer, max_tokens, skipped, truncated)
            pending = []
    if pending:
        yield _tokenize(pending, tokenizer, max_tokens, skipped, truncated)


def _tokenize(pending, tokenizer, max_tokens, skipped, truncated=None) -> list[Document]:
    texts = [text for _, _, text in pending]
    if not max_tokens:
        encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    else:
        # One token more than allowed says which documents were cut (exactly max_tokens may be a
        # whole one); only those are tokenized again, by the tokenizer's own truncation, so the
        # ids are what a single truncating call gives (special tokens kept where it keeps them).
        encoded = _encode(tokenizer, texts, max_tokens + 1)
        cut = [i for i, ids in enumerate(encoded) if len(ids) > max_tokens]
        for i, ids in zip(cut, _encode(tokenizer, [texts[i] for i in cut], max_tokens) if cut else ()):
            encoded[i] = ids
        if truncated is not None:
            truncated.extend(pending[i][1] for i in cut)
    docs = []
    for (doc_id, row, text), ids in zip(pending, encoded):
        if not ids:
            if skipped is not None:
                skipped.append(row)
            continue
        docs.append(Document(doc_id, row, np.asarray(ids, dtype=np.int64), text_sha256(text)))
    return docs


def _encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return list(tokenizer(texts, add_special_tokens=True, verbose=False, truncation=True,
                          max_length=max_length)["input_ids"])


def pack(docs: list[Document], batch_tokens: int) -> list[Batch]:
    """Longest first (a batch too big for the device fails at once, not at the end); a document
    longer than batch_tokens is a batch of its own."""
    ordered = sorted(docs, key=lambda d: (-len(d.ids), d.doc_id))
    batches, current = [], []
    for d in ordered:
        longest = len(current[0].ids) if current else len(d.ids)  # sorted: the first is the longest
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(Batch(tuple(current)))
            current = []
        current.append(d)
    if current:
        batches.append(Batch(tuple(current)))
    return batches


class RankPlan:
    """Which rank traces which batch: greedy by padded tokens, deterministic."""

    def __init__(self, world_size: int):
        self.load = [0] * world_size

    def assign(self, batch: Batch) -> int:
        rank = min(range(len(self.load)), key=lambda r: (self.load[r], r))
        self.load[rank] += batch.padded_tokens
        return rank


def rank_batches(windows: Iterable[list[Document]], batch_tokens: int, rank: int,
                 world_size: int) -> Iterator[Batch]:
    """This rank's batches, in plan order."""
    plan = RankPlan(world_size)
    for docs in windows:
        for batch in pack(docs, batch_tokens):
            if plan.assign(batch) == rank:
                yield batch


def shard_groups(batches: Iterable[Batch], docs_per_shard: int) -> Iterator[list[Batch]]:
    """Consecutive batches, closed once they hold docs_per_shard documents or more: the shard
    boundaries follow from the plan alone, so a resumed run finds the same shards."""
    group, count = [], 0
    for batch in batches:
        group.append(batch)
        count += len(batch.docs)
        if count >= docs_per_shard:
            yield group
            group, count = [], 0
    if group:
        yield group
