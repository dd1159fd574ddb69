"""Packing token streams into fixed ``block_size + 1`` rows of global batches, world-size invariant.

Global batches have ``R = batch_size * process_count`` rows; process p produces rows
``[p * batch_size, (p + 1) * batch_size)``. Each design below fixes every row's content from the
seed and R alone, so the global batch sequence does not depend on how rows are split over
processes, and each process touches only the data of its own rows.

Shards (random access): sequence i is tokens ``[i * (T + 1), (i + 1) * (T + 1))`` of the
concatenated shards; epoch e visits sequences in the order ``permutation(seed, e)`` and global
batch b takes entries ``[b * R, (b + 1) * R)`` of it. The position is ``(epoch, batch)``.

Text (sequential): row r is a lane fed by the documents whose split index g satisfies
``g % R == r``, each followed by EOS and cut into rows with no padding, so every token appears
once, in order. A lane's position is ``[g, epoch, raw, offset]``: its current document, where the
source yields it, and how many of its tokens were already emitted; a process restarts its reader at
the earliest such document among its lanes.

Documents are tokenized in chunks as the lanes run dry. Chunk boundaries never change a row (each
document is encoded on its own), only when the work is done, so they are sized for latency: a
chunk ends after ``chunk`` documents, at the end of a pass over the source (a small file is never
cycled many times to fill one chunk), or once its text reaches a character budget that starts at
about one batch of this process's rows and doubles with each chunk (the first batch comes after
about a batch's worth of tokenizing; later chunks reach the full batching of ``chunk``).

Segment ids count EOS tokens before each input position, so a document's tokens and its closing
EOS share one id, and each row starts at 0.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterator

import numpy as np

from swamla.data.config import DataError
from swamla.data.shards import ShardSet

_CHARS_PER_TOKEN = 4  # about GPT-2's average on English text; only sizes chunks, never rows


def segment_ids(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """int32 ids, per row, of the document each input token belongs to (EOS closes a document)."""
    seg = np.zeros(inputs.shape, dtype=np.int32)
    np.cumsum(inputs[:, :-1] == eos_id, axis=1, dtype=np.int32, out=seg[:, 1:])
    return seg


def document_targets(inputs: np.ndarray, targets: np.ndarray, eos_id: int) -> np.ndarray:
    """``targets`` with -100 where the input is a document's EOS, whose target is the next
    document's first token: no loss across a boundary (SPEC 3.3); the EOS is still predicted."""
    return np.where(inputs == eos_id, -100, targets).astype(np.int32)


class ShardSampler:
    """Rows of global batches drawn from pre-tokenized shards (see the module docstring)."""

    def __init__(self, shards: ShardSet, *, rows: range, global_rows: int, block_size: int,
                 shuffle: bool, seed: int):
        self.shards, self.rows, self.global_rows = shards, rows, global_rows
        self.span = block_size + 1
        self.shuffle, self.seed = shuffle, seed
        self.num_sequences = shards.num_tokens // self.span
        self.batches_per_epoch = self.num_sequences // global_rows
        # A validation split smaller than one batch (the one document held out of a small
        # corpus) is read as a cycle of its tokens; a training split that small is an error.
        self.cyclic = self.batches_per_epoch == 0 and not shuffle and shards.num_tokens > 0
        if self.batches_per_epoch == 0 and not self.cyclic:
            raise DataError(f"shards hold {shards.num_tokens} tokens = {self.num_sequences} "
                            f"sequences of {self.span}, fewer than one global batch of "
                            f"{global_rows} rows; prepare more data or lower batch_size/block_size")
        self._order_epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
                           if self.shuffle else np.arange(self.num_sequences))
            self._order_epoch = epoch
        return self._order

    def batches(self, epoch: int, batch: int) -> Iterator[tuple[np.ndarray, dict]]:
        """Endless ``(rows (B, T+1), position after them)`` starting at ``(epoch, batch)``."""
        while self.cyclic:
            start = (batch * self.global_rows + self.rows.start) * self.span
            batch += 1
            yield np.stack([self.shards.read_cyclic(start + i * self.span, self.span)
                            for i in range(len(self.rows))]), {"epoch": epoch, "batch": batch}
        while True:
            order = self._epoch_order(epoch)
            base = batch * self.global_rows
            idx = order[base + self.rows.start: base + self.rows.stop]
            out = np.stack([self.shards.read(int(i) * self.span, self.span) for i in idx])
            batch += 1
            if batch == self.batches_per_epoch:
                epoch, batch = epoch + 1, 0
            yield out, {"epoch": epoch, "batch": batch}


class _Lane:
    __slots__ = ("doc", "offset")

    def __init__(self):
        self.doc = None  # (g, epoch, raw, ids with EOS)
        self.offset = 0


class DocumentCache:
    """Encoded documents (ids with EOS) by source position ``(epoch, raw)``, up to a token budget.

    Kept by the validation loader across resets: every evaluation re-reads the same documents
    from the start, so only the first evaluation tokenizes them. A position always holds the same
    text (sources are deterministic), which is what makes the key valid.
    """

    def __init__(self, max_tokens: int):
        self.ids: dict[tuple[int, int], np.ndarray] = {}
        self.room = max_tokens

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        return self.ids.get(key)

    def put(self, key: tuple[int, int], ids: np.ndarray) -> None:
        if len(ids) <= self.room:
            self.ids[key] = ids
            self.room -= len(ids)


class LanePacker:
    """Rows of global batches packed from a sequential document source (module docstring).

    ``documents(epoch, raw, g)`` yields ``(g, epoch, raw, text)`` from a restart point;
    ``encode(texts)`` returns their ids. Only documents of this process's lanes are tokenized.
    ``cache`` (optional, a ``DocumentCache``) holds ids already encoded and takes new ones.
    """

    def __init__(self, documents: Callable[..., Iterator], encode: Callable, *, rows: range,
                 global_rows: int, block_size: int, eos_id: int, chunk: int,
                 lane_state: dict[int, list[int]] | None, cache: DocumentCache | None = None,
                 base: tuple[int, int, int] = (0, 0, 0)):
        self.rows, self.global_rows, self.span = rows, global_rows, block_size + 1
        self.encode, self.eos_id, self.chunk = encode, eos_id, chunk
        self.cache = cache
        self.budget = len(rows) * self.span * _CHARS_PER_TOKEN  # characters of the next chunk
        self.pending = None  # a document read past the end of a pass, first in the next chunk
        self.lanes = {r: _Lane() for r in rows}
        self.buffers = {r: collections.deque() for r in rows}
        # Resume: each lane first re-reads its current document, then drops `offset` tokens. A
        # lane with no saved position (a mixture row that never drew this source, or every lane
        # after the global batch changed) starts at its first document from `base`, the
        # (g, epoch, raw) where the reader then starts.
        lane_state = self.saved = lane_state or {}
        self.base = tuple(int(v) for v in base)
        g0 = self.base[0]
        self.first_g = {r: lane_state[r][0] if r in lane_state else g0 + (r - g0) % global_rows
                        for r in rows}
        self.offsets = {r: lane_state[r][3] if r in lane_state else 0 for r in rows}
        if all(r in lane_state for r in rows):
            g, epoch, raw, _ = min((lane_state[r] for r in rows), key=lambda s: s[0])
            self.reader = documents(epoch=epoch, raw=raw, g=g)
        else:
            self.reader = documents(epoch=self.base[1], raw=self.base[2], g=g0)

    def _read_chunk(self) -> None:
        """Tokenize the next documents of this process's lanes (chunk sizes: module docstring)."""
        docs, texts, chars = [], [], 0
        while len(docs) < self.chunk and chars < self.budget:
            doc, self.pending = self.pending or next(self.reader), None
            g, epoch, raw, text = doc
            lane = g % self.global_rows
            if lane not in self.lanes or g < self.first_g[lane]:
                continue
            if docs and epoch != docs[0][1]:  # one pass over the source is done
                self.pending = doc
                break
            ids = self.cache.get((epoch, raw)) if self.cache is not None else None
            if ids is None:
                texts.append(text)
                chars += len(text)
            docs.append((g, epoch, raw, lane, ids))
        self.budget *= 2
        encoded = iter(self.encode(texts) if texts else ())
        eos = np.array([self.eos_id], dtype=np.uint32)
        for g, epoch, raw, lane, ids in docs:
            if ids is None:
                ids = np.concatenate([next(encoded), eos])
                if self.cache is not None:
                    self.cache.put((epoch, raw), ids)
            self.buffers[lane].append((g, epoch, raw, ids))

    def _next_doc(self, r: int) -> None:
        while not self.buffers[r]:
            self._read_chunk()
        self.lanes[r].doc = self.buffers[r].popleft()
        self.lanes[r].offset = self.offsets.pop(r, 0)

    def fill(self, r: int, out: np.ndarray) -> None:
        """Write lane ``r``'s next ``block_size + 1`` tokens into ``out``."""
        lane, filled = self.lanes[r], 0
        while filled < self.span:
            if lane.doc is None or lane.offset >= len(lane.doc[3]):
                self._next_doc(r)
                continue
            take = lane.doc[3][lane.offset:lane.offset + self.span - filled]
            out[filled:filled + len(take)] = take
            filled += len(take)
            lane.offset += len(take)

    def batches(self) -> Iterator[tuple[np.ndarray, dict]]:
        """Endless ``(rows (B, T+1), lane positions after them)``."""
        while True:
            out = np.empty((len(self.rows), self.span), dtype=np.uint32)
            for i, r in enumerate(self.rows):
                self.fill(r, out[i])
            yield out, self.lane_state()

    def lane_state(self) -> dict[str, list[int]]:
        """``{row: [g, epoch, raw, offset]}`` of the lanes that have started (see module doc);
        a lane not filled since a restart keeps its restored position."""
        out = {}
        for r, lane in self.lanes.items():
            if lane.doc is not None:
                out[str(r)] = [int(lane.doc[0]), int(lane.doc[1]), int(lane.doc[2]),
                               int(lane.offset)]
            elif r in self.saved:
                out[str(r)] = [int(v) for v in self.saved[r]]
        return out

    def earliest(self) -> tuple[int, int]:
        """(epoch, raw) of the first document a restart of these lanes reads."""
        lanes = self.lane_state()
        if len(lanes) < len(self.lanes):
            return self.base[1], self.base[2]
        _, epoch, raw, _ = min(lanes.values(), key=lambda s: s[0])
        return epoch, raw
