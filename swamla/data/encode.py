"""Batched tokenization, in the calling thread or in a pool of worker processes.

Workers receive the exact tokenizer as its serialized JSON (no hub access, identical ids) and are
started with the ``spawn`` method: the loader calls this from a background thread, and forking a
multi-threaded process (JAX, PyTorch, Rust thread pools) can deadlock the child. The pool starts
on the first batch of texts large enough to use it, so small first chunks do not wait for it.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Sequence

import numpy as np

from swamla.data.config import DataError
from swamla.tokenizer import Tokenizer, TokenizerError, load_tokenizer

_worker_backend = None  # the tokenizers.Tokenizer of a pool worker process


def _init_worker(tokenizer_json: str) -> None:
    global _worker_backend
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker; the pool is the parallelism
    from tokenizers import Tokenizer as FastTokenizer

    _worker_backend = FastTokenizer.from_str(tokenizer_json)


def _encode_part(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    # One flat array plus lengths pickles far faster than a list of Python int lists.
    encs = _worker_backend.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
    flat = np.fromiter((i for e in encs for i in e.ids), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


class Encoder:
    """Encode lists of documents to uint32 id arrays; ``num_workers`` 0 encodes in-thread."""

    def __init__(self, tokenizer: Tokenizer, num_workers: int = 0):
        self.tokenizer = tokenizer
        self.num_workers = num_workers
        self._pool = None

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self.num_workers == 0 or len(texts) < 2 * self.num_workers:
            return self.tokenizer.encode_batch(texts)
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.num_workers, initializer=_init_worker,
                                  initargs=(self.tokenizer.backend.to_str(),))
        k = self.num_workers * 4  # a few parts per worker balances unequal document lengths
        bounds = np.linspace(0, len(texts), k + 1).astype(int)
        parts = [list(texts[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        out: list[np.ndarray] = []
        for flat, lengths in self._pool.map(_encode_part, parts):
            out.extend(np.split(flat, np.cumsum(lengths)[:-1]))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def data_tokenizer(name: str) -> Tokenizer:
    """``load_tokenizer(name)``, its errors raised as ``DataError`` (the data pipeline's error)."""
    try:
        return load_tokenizer(name)
    except TokenizerError as e:
        raise DataError(f"tokenizer_name: {e}") from e
