"""The batch loader both trainers call: numpy batches, resumable, prefetched in a background thread.

``build_loader(cfg, split, batch_size=B, block_size=T, seed, process_index=p, process_count=P)``
returns an endless iterator of ``Batch`` (int32 ``inputs``, ``targets``, ``segment_ids`` of shape
(B, T)). Process p's batch is rows ``[p*B, (p+1)*B)`` of a global batch of B*P rows whose sequence
depends only on the data, seed, B*P and T (see ``packing``).

State: ``state_dict()`` is a small JSON-serializable dict describing the position after the last
batch returned. For shards it is global (any process's copy restores every process). For text
sources it holds the positions of this process's rows only; save each process's state, or
combine them with ``merge_states`` (rows are keyed globally, so the merged state restores every
process, with any process count of the same global batch size).
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from typing import Any, Mapping

import numpy as np

from swamla.data.config import DataConfig, DataError
from swamla.data.encode import Encoder, data_tokenizer
from swamla.data.packing import DocumentCache, LanePacker, ShardSampler, segment_ids
from swamla.data.shards import ShardSet, find_shards
from swamla.data.sources import open_source, split_documents
from swamla.tokenizer import Tokenizer

SPLITS = ("train", "val")
_POLL_S = 0.1  # how often blocked queue calls re-check for shutdown
_VAL_CACHE_TOKENS = 1 << 22  # 16 MiB of ids: far more than an evaluation reads


@dataclasses.dataclass(frozen=True)
class Batch:
    """One process's part of a global batch; all arrays int32 of shape (B, T)."""

    inputs: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Failure:
    error: BaseException


class DataLoader:
    """Endless, deterministic, resumable batches with background prefetch; see module docstring."""

    def __init__(self, cfg: DataConfig, split: str, *, batch_size: int, block_size: int,
                 seed: int, process_index: int, process_count: int,
                 tokenizer: Tokenizer | None = None):
        if split not in SPLITS:
            raise DataError(f"split must be one of {list(SPLITS)}, got {split!r}")
        for name, value, minimum in (("batch_size", batch_size, 1), ("block_size", block_size, 1),
                                     ("process_count", process_count, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not (isinstance(process_index, int) and 0 <= process_index < process_count):
            raise DataError(f"process_index must be in [0, {process_count}), got {process_index!r}")
        self.cfg, self.split = cfg, split
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.global_rows = batch_size * process_count
        self.rows = range(process_index * batch_size, (process_index + 1) * batch_size)
        self.shuffle = cfg.shuffle and split == "train"  # eval sees the same batches every time
        self.kind = "shards" if cfg.source == "shards" else "text"
        if self.kind == "shards":
            paths = find_shards(cfg.val_paths if split == "val" and cfg.val_paths
                                else cfg.train_paths, split,
                                field="val_paths" if split == "val" and cfg.val_paths
                                else "train_paths")
            self.shards = ShardSet(paths, tokenizer_name=cfg.tokenizer_name)
            self.eos_id = self.shards.eos_id
            self._sampler = ShardSampler(self.shards, rows=self.rows, global_rows=self.global_rows,
                                         block_size=block_size, shuffle=self.shuffle, seed=seed)
        else:
            self.tokenizer = tokenizer or data_tokenizer(cfg.tokenizer_name)
            self.eos_id = self.tokenizer.eos_id
            self._source, self._hashed = open_source(cfg, split, shuffle=self.shuffle, seed=seed)
        # Kept across reset(): the worker pool, and for validation the documents already encoded.
        self._encoder: Encoder | None = None
        self._cache = DocumentCache(_VAL_CACHE_TOKENS) if split == "val" else None
        self._state = self._initial_state()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ state
    def _header(self) -> dict[str, Any]:
        return {"kind": self.kind, "split": self.split, "seed": self.seed,
                "block_size": self.block_size, "global_rows": self.global_rows}

    def _initial_state(self) -> dict[str, Any]:
        pos = {"epoch": 0, "batch": 0} if self.kind == "shards" else {"lanes": {}}
        return {**self._header(), **pos}

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch returned (JSON-serializable ints and strings)."""
        return _copy_state(self._state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the run that saved ``state`` stopped."""
        for key, want in self._header().items():
            if state.get(key) != want:
                raise DataError(f"loader state has {key}={state.get(key)!r} but this loader has "
                                f"{key}={want!r}; restore with the same data source, split, seed, "
                                "block_size and global batch size (batch_size * process_count)")
        if self.kind == "text":
            lanes = state.get("lanes", {})
            missing = [r for r in self.rows if str(r) not in lanes]
            if lanes and missing:
                raise DataError(f"loader state has no position for rows {missing[:8]}...; it was "
                                "saved by another process: save every process's state_dict() and "
                                "combine them with swamla.data.merge_states")
        self._shutdown()
        self._state = _copy_state(state)

    def reset(self) -> None:
        """Back to the first batch (e.g. before each evaluation); the tokenization workers are kept,
        and a validation loader keeps the documents it already encoded."""
        self._shutdown()
        self._state = self._initial_state()

    # ------------------------------------------------------------------ iteration
    def _batches(self):
        state = self._state
        if self.kind == "shards":
            yield from self._sampler.batches(state["epoch"], state["batch"])
            return
        if self._encoder is None:
            self._encoder = Encoder(self.tokenizer, self.cfg.num_workers)
        lanes = {int(r): v for r, v in state["lanes"].items()}
        documents = functools.partial(split_documents, self._source, split=self.split,
                                      hashed=self._hashed, val_fraction=self.cfg.val_fraction)
        packer = LanePacker(documents, self._encoder, rows=self.rows, global_rows=self.global_rows,
                            block_size=self.block_size, eos_id=self.eos_id,
                            chunk=self.cfg.tokenize_chunk, lane_state=lanes, cache=self._cache)
        for rows, lane_pos in packer.batches():
            yield rows, {"lanes": lane_pos}

    def _make_batch(self, rows: np.ndarray) -> Batch:
        inputs = rows[:, :-1].astype(np.int32)
        return Batch(inputs=inputs, targets=rows[:, 1:].astype(np.int32),
                     segment_ids=segment_ids(inputs, self.eos_id))

    def _worker(self, q: queue.Queue, stop: threading.Event) -> None:
        header = self._header()
        batches = self._batches()
        try:
            for rows, pos in batches:
                item = (self._make_batch(rows), {**header, **pos})
                if not _put(q, item, stop):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            _put(q, _Failure(e), stop)
        finally:
            batches.close()

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._stop = threading.Event()
            self._queue = queue.Queue(maxsize=self.cfg.prefetch)
            self._thread = threading.Thread(target=self._worker, args=(self._queue, self._stop),
                                            name=f"swamla-data-{self.split}", daemon=True)
            self._thread.start()
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise DataError(
                        "the data loader thread stopped without a batch or an error") from None
        if isinstance(item, _Failure):
            self._shutdown()
            raise item.error
        batch, self._state = item
        return batch

    # ------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        if getattr(self, "_thread", None) is None:  # never started, or __init__ raised
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a worker waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)
        self._thread = self._queue = None

    def close(self) -> None:
        """Stop the prefetch thread and tokenization workers; safe to call twice."""
        self._shutdown()
        if getattr(self, "_encoder", None) is not None:
            self._encoder.close()
            self._encoder = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state)
    if "lanes" in out:
        out["lanes"] = {str(r): [int(v) for v in pos] for r, pos in out["lanes"].items()}
    return out


def merge_states(states: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One state restoring every process, from each process's ``state_dict()`` of one step."""
    if not states:
        raise DataError("merge_states needs at least one loader state")
    first = states[0]
    for s in states[1:]:
        diff = [k for k in ("kind", "split", "seed", "block_size", "global_rows")
                if s.get(k) != first.get(k)]
        if diff:
            raise DataError(f"loader states disagree on {diff}; merge states of one run and step")
    if first["kind"] == "shards":
        if any((s["epoch"], s["batch"]) != (first["epoch"], first["batch"]) for s in states):
            raise DataError("shard loader states are at different batches; merge states saved "
                            "at the same step")
        return _copy_state(first)
    lanes: dict[str, list[int]] = {}
    for s in states:
        lanes.update(s["lanes"])
    return _copy_state({**first, "lanes": lanes})


def build_loader(cfg: DataConfig, split: str = "train", *, batch_size: int, block_size: int,
                 seed: int = 0, process_index: int = 0, process_count: int = 1,
                 tokenizer: Tokenizer | None = None) -> DataLoader:
    """A loader of ``split`` for process ``process_index`` of ``process_count``."""
    return DataLoader(cfg, split, batch_size=batch_size, block_size=block_size, seed=seed,
                      process_index=process_index, process_count=process_count,
                      tokenizer=tokenizer)
