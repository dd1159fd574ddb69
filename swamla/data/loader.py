"""The batch loader both trainers call: numpy batches, resumable, prefetched in a background thread.

``build_loader(cfg, split, batch_size=B, block_size=T, seed, process_index=p, process_count=P)``
returns an endless iterator of ``Batch`` (int32 ``inputs``, ``targets``, ``segment_ids`` of shape
(B, T)). Process p's batch is rows ``[p*B, (p+1)*B)`` of a global batch of B*P rows whose sequence
depends only on the data, seed, B*P and T (see ``packing``).

State: ``state_dict()`` is a small JSON-serializable dict describing the position after the last
batch returned (format: ``swamla.data.state``). For shards it is global (any process's copy
restores every process). For text sources it holds the positions of this process's rows only;
save each process's state, or combine them with ``merge_states`` (rows are keyed globally, so the
merged state restores every process, with any process count of the same global batch size).
Mixtures (``swamla.data.mixture``) hold both kinds, one per source.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
from typing import Any, Mapping

import numpy as np

from swamla.data.config import DataConfig, DataError, source_names
from swamla.data.encode import Encoder, data_tokenizer
from swamla.data.mixture import Mixture, check_eos
from swamla.data.packing import DocumentCache, LanePacker, ShardSampler, segment_ids
from swamla.data.shards import ShardSet, find_shards
from swamla.data.sources import StreamingSource, open_source, split_documents
from swamla.data.state import (VERSION, changes, copy_state, merge_states, refusal,
                               regroup_lanes, token_position)
from swamla.tokenizer import Tokenizer

__all__ = ["Batch", "DataLoader", "build_loader", "merge_states"]
logger = logging.getLogger(__name__)

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
        self.names = source_names(cfg)
        self.labels = self.names
        if cfg.mixture:
            self.kind = "mixture"
            self._mix = Mixture(cfg, split, rows=self.rows, global_rows=self.global_rows,
                                block_size=block_size, shuffle=self.shuffle, seed=seed)
            self.labels = self._mix.labels
            self.tokenizer = (tokenizer or data_tokenizer(cfg.tokenizer_name)
                              if self._mix.has_text else None)
            self.eos_id = check_eos(self._mix, self.tokenizer and self.tokenizer.eos_id)
        elif cfg.source == "shards":
            self.kind = "shards"
            paths = find_shards(cfg.val_paths if split == "val" and cfg.val_paths
                                else cfg.train_paths, split,
                                field="val_paths" if split == "val" and cfg.val_paths
                                else "train_paths")
            self.shards = ShardSet(paths, tokenizer_name=cfg.tokenizer_name)
            self.eos_id = self.shards.eos_id
            self._sampler = ShardSampler(self.shards, rows=self.rows, global_rows=self.global_rows,
                                         block_size=block_size, shuffle=self.shuffle, seed=seed)
        else:
            self.kind = "text"
            self.tokenizer = tokenizer or data_tokenizer(cfg.tokenizer_name)
            self.eos_id = self.tokenizer.eos_id
            self._source, self._rule = open_source(cfg, split, shuffle=self.shuffle, seed=seed)
        # Kept across reset(): the worker pool, and for validation the documents already encoded.
        self._encoder: Encoder | None = None
        self._cache = DocumentCache(_VAL_CACHE_TOKENS) if split == "val" else None
        self._state = self._initial_state()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ state
    def _header(self) -> dict[str, Any]:
        return {"version": VERSION, "kind": self.kind, "split": self.split, "seed": self.seed,
                "block_size": self.block_size, "global_rows": self.global_rows,
                "names": list(self.names)}

    def _initial_state(self) -> dict[str, Any]:
        if self.kind == "shards":
            pos = {"epoch": 0, "batch": 0}
        elif self.kind == "text":
            pos = {"lanes": {}, "base": [0, 0, 0], "stream": []}
        else:
            pos = self._mix.initial()
        return {**self._header(), **pos, "tokens": {label: 0 for label in self.labels}}

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch returned (JSON-serializable); see ``swamla.data.state``."""
        return copy_state(self._state)

    def token_counts(self) -> dict[str, int]:
        """Training tokens (``block_size`` per row) read from each source, by source."""
        return dict(self._state["tokens"])

    def token_metrics(self) -> dict[str, int]:
        """A mixture's ``token_counts`` as log metrics ``tokens[LOCATION]``; none for one source."""
        if self.kind != "mixture":
            return {}
        return {f"tokens[{label}]": n for label, n in self._state["tokens"].items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where the run that saved ``state`` stopped. A position saved with other
        training data, block_size, global batch size or seed is handled as ``resume_data`` says."""
        saved, header = copy_state(state), self._header()
        if saved.get("split") != self.split:
            raise DataError(f"loader state is of split {saved.get('split')!r}, this loader reads "
                            f"{self.split!r}")
        if "version" not in saved:
            logger.warning("the data position was saved by an earlier version that did not name "
                           "its training data; taking it to be this run's (%s)",
                           ", ".join(self.names))
        streamed = self.kind == "text" and isinstance(self._source, StreamingSource)
        what = changes(saved, header, order_changed="version" not in saved and streamed
                       and self.shuffle and bool(saved.get("lanes")))
        if what and self.cfg.resume_data == "restart":
            logger.warning("data position not resumed (%s): resume_data=restart starts this "
                           "run's data from its beginning", "; ".join(what))
            self._shutdown()
            self._state = self._initial_state()
            return
        if what and self.cfg.resume_data == "exact":
            raise refusal(what)
        if what:
            saved = self._continue(saved)
            logger.warning("data position continued across a change (%s): resume_data=continue",
                           "; ".join(what))
        elif self.kind == "text":
            missing = [r for r in self.rows if str(r) not in saved.get("lanes", {})]
            if saved.get("lanes") and missing:
                raise DataError(f"loader state has no position for rows {missing[:8]}...; it was "
                                "saved by another process: save every process's state_dict() and "
                                "combine them with swamla.data.merge_states")
        tokens = saved.get("tokens", {})
        self._shutdown()
        self._state = {**saved, **header,
                       "tokens": {label: int(tokens.get(label, 0)) for label in self.labels}}

    def _continue(self, saved: dict[str, Any]) -> dict[str, Any]:
        """``saved``'s position carried over to this loader's block_size and global batch."""
        if saved.get("kind") != self.kind:
            raise DataError(f"the checkpoint's data position is of a {saved.get('kind')} source "
                            f"and this run reads a {self.kind} source: a position cannot carry "
                            "over; use --resume_data restart to start this run's data from its "
                            "beginning")
        old_span, old_rows = saved["block_size"] + 1, saved["global_rows"]
        span, rows = self.block_size + 1, self.global_rows
        if self.kind == "shards":
            done = token_position(saved["batch"] * old_rows, old_span, span)
            batch = -(-done // rows)
            per_epoch = self._sampler.batches_per_epoch
            return {**saved, "epoch": saved["epoch"] + batch // per_epoch,
                    "batch": batch % per_epoch}
        if self.kind == "text":
            return {**saved, **regroup_lanes(saved)} if old_rows != rows else saved
        subs = saved["sources"]
        kinds = ["draws" in sub for sub in subs]
        if kinds != [p.kind == "shards" for p in self._mix.parts]:
            raise DataError(f"the checkpoint's mixture has {len(subs)} sources of other kinds "
                            f"than this run's {len(self._mix.parts)}: a position cannot carry "
                            "over; use --resume_data restart")
        return {**saved, "sources": [
            {"draws": token_position(sub["draws"], old_span, span)} if "draws" in sub else
            {**sub, **regroup_lanes(sub)} if old_rows != rows else sub for sub in subs]}

    def reset(self) -> None:
        """Back to the first batch (e.g. before each evaluation); the tokenization workers are kept,
        and a validation loader keeps the documents it already encoded."""
        self._shutdown()
        self._state = self._initial_state()

    # ------------------------------------------------------------------ iteration
    def _batches(self):
        """Endless ``(rows, position after them, rows drawn per source)``."""
        state, every = self._state, [self.global_rows]
        if self.kind == "shards":
            for rows, pos in self._sampler.batches(state["epoch"], state["batch"]):
                yield rows, pos, every
            return
        if self._encoder is None:
            self._encoder = Encoder(self.tokenizer, self.cfg.num_workers)
        if self.kind == "mixture":
            yield from self._mix.batches(state, encoder=self._encoder, eos_id=self.eos_id,
                                         chunk=self.cfg.tokenize_chunk)
            return
        if isinstance(self._source, StreamingSource):
            self._source.restore(state.get("stream", []))
        lanes = {int(r): v for r, v in state["lanes"].items()}
        documents = functools.partial(split_documents, self._source, split=self.split,
                                      rule=self._rule)
        packer = LanePacker(documents, self._encoder, rows=self.rows, global_rows=self.global_rows,
                            block_size=self.block_size, eos_id=self.eos_id,
                            chunk=self.cfg.tokenize_chunk, lane_state=lanes, cache=self._cache,
                            base=tuple(state.get("base", (0, 0, 0))))
        for rows, lane_pos in packer.batches():
            stream = self._source.position(*packer.earliest())
            yield rows, {"lanes": lane_pos, "base": list(packer.base),
                         "stream": [stream] if stream else []}, every

    def _make_batch(self, rows: np.ndarray) -> Batch:
        inputs = rows[:, :-1].astype(np.int32)
        return Batch(inputs=inputs, targets=rows[:, 1:].astype(np.int32),
                     segment_ids=segment_ids(inputs, self.eos_id))

    def _worker(self, q: queue.Queue, stop: threading.Event) -> None:
        header = self._header()
        tokens = dict(self._state["tokens"])
        batches = self._batches()
        try:
            for rows, pos, drawn in batches:
                for label, n in zip(self.labels, drawn):
                    tokens[label] += int(n) * self.block_size
                item = (self._make_batch(rows), {**header, **pos, "tokens": dict(tokens)})
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


def build_loader(cfg: DataConfig, split: str = "train", *, batch_size: int, block_size: int,
                 seed: int = 0, process_index: int = 0, process_count: int = 1,
                 tokenizer: Tokenizer | None = None) -> DataLoader:
    """A loader of ``split`` for process ``process_index`` of ``process_count``."""
    return DataLoader(cfg, split, batch_size=batch_size, block_size=block_size, seed=seed,
                      process_index=process_index, process_count=process_count,
                      tokenizer=tokenizer)
