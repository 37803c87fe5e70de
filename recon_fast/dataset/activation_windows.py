"""Documents into context windows the way SAELens's CacheActivationsRunner makes them (sae-lens
6.54.12: `ActivationsStore._iterate_tokenized_sequences` -> `concat_and_batch_sequences`), then
windows into batches and shards, the same on every run and every rank.

SAELens's policy, which the cache must share so that training sees what its own runner would
have written: each document is tokenized as `HookedProxyLM.to_tokens` does (the tokenizer's
special tokens, minus the leading BOS when the tokenizer adds one); the documents are concatenated
into one stream, cut into windows of exactly context_size tokens; each window starts with BOS
(prepend_bos, unless its first token is BOS already) and documents meeting inside a window are
separated by BOS (unless the next one starts with it); a document longer than the room left
continues in the next window, after that window's BOS; the last, incomplete window is dropped.
A tokenizer without a BOS token gets plain concatenation. So there is no padding anywhere: every
window is context_size real tokens, and batches are whole windows.

Memory: one window of documents' token ids and one batch of windows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from recon_fast.dataset import batching


@dataclass(frozen=True)
class WindowPolicy:
    context_size: int
    begin_id: int | None  # at position 0 of every window (BOS with prepend_bos), or None
    separator_id: int | None  # between documents within a window (SAELens's default: BOS), or None
    strip_leading_bos: bool  # the tokenizer adds a BOS that HookedProxyLM.to_tokens removes


def policy(tokenizer, context_size: int, prepend_bos: bool = True) -> WindowPolicy:
    """SAELens's runner settings for `tokenizer`: begin_batch_token_id = BOS when prepend_bos,
    sequence_separator_token = "bos" (the runner never changes it), no begin_sequence token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    bos = bos if isinstance(bos, int) else None
    return WindowPolicy(context_size, bos if prepend_bos else None, bos,
                        bool(getattr(tokenizer, "add_bos_token", False)))


def document_ids(tokenizer, source_documents: Iterable[tuple[int, str]], rule: WindowPolicy,
                 window: int = 1024) -> Iterator[np.ndarray]:
    """Each document's token ids ([tokens] int64), tokenized `window` documents at a time, as
    HookedProxyLM.to_tokens gives them: no truncation, and the first token dropped where the
    tokenizer prepends BOS itself (TransformerLens's get_tokens_with_bos_removed, right padding)."""
    for docs in batching.tokenized_windows(source_documents, tokenizer, None, window):
        for doc in docs:
            ids = doc.ids[1:] if rule.strip_leading_bos else doc.ids
            if len(ids):
                yield ids


class WindowPacker:
    """SAELens's concat_and_batch_sequences (disable_concat_sequences=False, no
    begin_sequence_token), fed one document at a time. Same windows, token for token: the
    comparisons below are SAELens's own (`first_token != id`), including at a document's
    continuation into a new window, where the first token is the one at the cut."""

    def __init__(self, rule: WindowPolicy):
        if rule.context_size < 2:
            # SAELens's loop never advances with context_size 1 and a BOS to prepend.
            raise ValueError(f"context_size must be 2 or more, got {rule.context_size}")
        self.rule = rule
        self._window = np.empty(rule.context_size, np.int64)
        self._filled = 0  # 0: no window begun (SAELens's `batch is None`)

    def feed(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        """The windows this document completes, each a fresh [context_size] int64 array."""
        size, offset, total = self.rule.context_size, 0, len(ids)
        while total - offset > 0:
            first = int(ids[offset])
            if self._filled == 0:
                prefix = [] if self.rule.begin_id is None or first == self.rule.begin_id else [self.rule.begin_id]
                needed = max(size - len(prefix), 0)
            else:
                prefix = [] if self.rule.separator_id is None or first == self.rule.separator_id \
                    else [self.rule.separator_id]
                needed = max(size - self._filled - len(prefix), 0)
                prefix = prefix[: size - self._filled]
            self._put(prefix)
            self._put(ids[offset: offset + needed])
            offset += needed
            if self._filled == size:
                yield self._window.copy()
                self._filled = 0

    @property
    def pending(self) -> int:
        """Tokens of the window begun and not completed: dropped at the end, as SAELens drops them."""
        return self._filled

    def _put(self, values) -> None:
        n = len(values)
        self._window[self._filled: self._filled + n] = values
        self._filled += n


def windows(documents: Iterable[np.ndarray], packer: WindowPacker, limit: int | None = None) -> Iterator[np.ndarray]:
    """The context windows of a stream of documents' ids, at most `limit` of them (the source is
    read no further than they need)."""
    if limit is not None and limit <= 0:
        return
    count = 0
    for ids in documents:
        for window in packer.feed(ids):
            yield window
            count += 1
            if limit is not None and count >= limit:
                return


@dataclass(frozen=True)
class ShardPlan:
    """Batches of `batch_windows` windows, shards of `batches_per_shard` batches; shard k goes to
    rank k % world_size. Shard boundaries follow from the settings alone, so every rank, and a
    resumed run, finds the same shards; a shard is the same file whichever rank writes it."""
    batch_windows: int
    batches_per_shard: int
    world_size: int = 1

    @property
    def windows_per_shard(self) -> int:
        return self.batch_windows * self.batches_per_shard

    def rank_of(self, shard: int) -> int:
        return shard % self.world_size

    def shards(self, stream: Iterable[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """(k, [windows, context_size] int64) for every shard of the stream, the last one short."""
        group: list[np.ndarray] = []
        k = 0
        for window in stream:
            group.append(window)
            if len(group) == self.windows_per_shard:
                yield k, np.stack(group)
                group, k = [], k + 1
        if group:
            yield k, np.stack(group)

    def batches(self, shard_ids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, [windows, context_size]) for each batch of one shard."""
        for start in range(0, len(shard_ids), self.batch_windows):
            yield start, shard_ids[start: start + self.batch_windows]
