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

Segment ids count EOS tokens before each input position, so a document's tokens and its closing
EOS share one id, and each row starts at 0.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterator

import numpy as np

from swamla.data.config import DataError
from swamla.data.shards import ShardSet


def segment_ids(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """int32 ids, per row, of the document each input token belongs to (EOS closes a document)."""
    seg = np.zeros(inputs.shape, dtype=np.int32)
    np.cumsum(inputs[:, :-1] == eos_id, axis=1, dtype=np.int32, out=seg[:, 1:])
    return seg


class ShardSampler:
    """Rows of global batches drawn from pre-tokenized shards (see the module docstring)."""

    def __init__(self, shards: ShardSet, *, rows: range, global_rows: int, block_size: int,
                 shuffle: bool, seed: int):
        self.shards, self.rows, self.global_rows = shards, rows, global_rows
        self.span = block_size + 1
        self.shuffle, self.seed = shuffle, seed
        self.num_sequences = shards.num_tokens // self.span
        self.batches_per_epoch = self.num_sequences // global_rows
        if self.batches_per_epoch == 0:
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


class LanePacker:
    """Rows of global batches packed from a sequential document source (module docstring).

    ``documents(epoch, raw, g)`` yields ``(g, epoch, raw, text)`` from a restart point;
    ``encode(texts)`` returns their ids. Only documents of this process's lanes are tokenized.
    """

    def __init__(self, documents: Callable[..., Iterator], encode: Callable, *, rows: range,
                 global_rows: int, block_size: int, eos_id: int, chunk: int,
                 lane_state: dict[int, list[int]] | None):
        self.rows, self.global_rows, self.span = rows, global_rows, block_size + 1
        self.encode, self.eos_id, self.chunk = encode, eos_id, chunk
        self.lanes = {r: _Lane() for r in rows}
        self.buffers = {r: collections.deque() for r in rows}
        if lane_state:
            # Resume: each lane first re-reads its current document, then drops `offset` tokens.
            self.first_g = {r: lane_state[r][0] for r in rows}
            self.offsets = {r: lane_state[r][3] for r in rows}
            g, epoch, raw, _ = min((lane_state[r] for r in rows), key=lambda s: s[0])
            self.reader = documents(epoch=epoch, raw=raw, g=g)
        else:
            self.first_g = {r: r for r in rows}
            self.offsets = {r: 0 for r in rows}
            self.reader = documents(epoch=0, raw=0, g=0)

    def _read_chunk(self) -> None:
        texts, metas = [], []
        while len(texts) < self.chunk:
            g, epoch, raw, text = next(self.reader)
            lane = g % self.global_rows
            if lane in self.lanes and g >= self.first_g[lane]:
                texts.append(text)
                metas.append((g, epoch, raw, lane))
        eos = np.array([self.eos_id], dtype=np.uint32)
        for (g, epoch, raw, lane), ids in zip(metas, self.encode(texts)):
            self.buffers[lane].append((g, epoch, raw, np.concatenate([ids, eos])))

    def _next_doc(self, r: int) -> None:
        while not self.buffers[r]:
            self._read_chunk()
        self.lanes[r].doc = self.buffers[r].popleft()
        self.lanes[r].offset = self.offsets.pop(r, 0)

    def _fill(self, r: int, out: np.ndarray) -> None:
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
                self._fill(r, out[i])
            state = {str(r): [int(self.lanes[r].doc[0]), int(self.lanes[r].doc[1]),
                              int(self.lanes[r].doc[2]), int(self.lanes[r].offset)]
                     for r in self.rows}
            yield out, state
