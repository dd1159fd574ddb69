"""Pre-tokenized binary shards: the format, a writer for ``prepare`` and a memory-mapped reader.

A shard is ``{split}_{index:06d}.bin``, a flat little-endian array of token ids (each document
followed by EOS, no header), beside ``{split}_{index:06d}.json`` naming the format, tokenizer,
vocab size, EOS id, dtype and token/document counts. The dtype is uint16 when every id fits
(vocab_size <= 65536), else uint32. The sidecar is written after the data, so a shard without
one is an interrupted write. Reading needs only numpy: no ``datasets``, no tokenizer, no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from swamla.data.config import DataError
from swamla.tokenizer import canonical_name

FORMAT = "swamla-token-shard"
VERSION = 1
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


class ShardWriter:
    """Append documents' ids to numbered shards of at most ``shard_tokens`` tokens each."""

    def __init__(self, out_dir: str | Path, split: str, *, tokenizer_name: str, vocab_size: int,
                 eos_id: int, shard_tokens: int = 100_000_000, dtype: str | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype) if dtype else dtype_for_vocab(vocab_size)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise DataError(f"shard dtype must be uint16 or uint32, got {self.dtype}")
        if vocab_size > np.iinfo(self.dtype).max + 1:
            raise DataError(f"vocab_size {vocab_size} does not fit shard dtype {self.dtype} "
                            f"(max id {np.iinfo(self.dtype).max}); use dtype uint32")
        self.split, self.shard_tokens = split, shard_tokens
        self.meta = {"format": FORMAT, "version": VERSION, "split": split,
                     "tokenizer": canonical_name(tokenizer_name), "vocab_size": int(vocab_size),
                     "eos_id": int(eos_id), "dtype": self.dtype.name}
        self.paths: list[Path] = []
        self.total_tokens = 0
        self._file = None
        self._tokens = self._docs = 0

    def add(self, ids: np.ndarray) -> None:
        """Append one document's ids (EOS already appended by the caller)."""
        if self._file is None:
            path = self.out_dir / f"{self.split}_{len(self.paths):06d}.bin"
            self.paths.append(path)
            self._file = open(path, "wb")
        self._file.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self._tokens += len(ids)
        self._docs += 1
        self.total_tokens += len(ids)
        if self._tokens >= self.shard_tokens:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._file.close()
        self._file = None
        meta = dict(self.meta, num_tokens=self._tokens, num_documents=self._docs)
        self.paths[-1].with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        self._tokens = self._docs = 0

    def close(self) -> None:
        if self._file is not None:
            self._finish_shard()


def read_meta(path: Path) -> dict:
    """The validated sidecar of shard ``path``."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise DataError(f"{path}: sidecar {sidecar.name} is missing (an interrupted prepare "
                        "run?); re-run python -m swamla.data.prepare")
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{sidecar} is not valid JSON ({e}); re-run prepare") from e
    missing = {"format", "version", "tokenizer", "vocab_size", "eos_id", "dtype",
               "num_tokens"} - set(meta)
    if meta.get("format") != FORMAT or missing:
        raise DataError(f"{sidecar} is not a {FORMAT} sidecar (missing {sorted(missing)}); "
                        "write shards with python -m swamla.data.prepare")
    if meta["version"] != VERSION:
        raise DataError(f"{sidecar}: shard format version {meta['version']} is not supported "
                        f"(this code reads {VERSION}); re-run prepare")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{sidecar}: dtype {meta['dtype']!r} must be uint16 or uint32")
    dtype = np.dtype(meta["dtype"])
    if meta["vocab_size"] > np.iinfo(dtype).max + 1:
        raise DataError(f"{sidecar}: vocab_size {meta['vocab_size']} is too large for dtype "
                        f"{dtype} (max id {np.iinfo(dtype).max}); re-run prepare, which picks "
                        "uint32 for vocabularies over 65536")
    expected = meta["num_tokens"] * dtype.itemsize
    if path.stat().st_size != expected:
        raise DataError(f"{path}: size {path.stat().st_size} bytes does not match the sidecar's "
                        f"{meta['num_tokens']} {dtype} tokens ({expected} bytes); the shard is "
                        "truncated or corrupt, re-run prepare")
    return meta


def find_shards(patterns: tuple[str, ...], split: str, *, field: str) -> list[Path]:
    """Shard files of ``split`` in directories, or the ``.bin`` files/globs named directly."""
    import glob

    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(p.glob(f"{split}_*.bin"))
            if not found and split == "val":
                raise DataError(
                    f"{field}: {p} holds no val_*.bin shards, so there is no validation split; "
                    "give validation data with --val_paths (.bin shards or a directory of them), "
                    "or prepare the corpus again into a new --out directory: prepare now holds "
                    "out at least one document of any corpus of two or more")
            if not found:
                raise DataError(f"{field}: {p} holds no {split}_*.bin shards; write them with "
                                f"python -m swamla.data.prepare --out {p}")
        elif any(c in pattern for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(pattern))
            if not found:
                raise DataError(f"{field}: glob {pattern!r} matches no shard files")
        elif p.is_file():
            found = [p]
        else:
            raise DataError(f"{field}: {pattern} does not exist; check the path")
        out.extend(found)
    for f in out:
        if f.suffix != ".bin":
            raise DataError(f"{field}: {f} is not a .bin shard; pass shard directories or .bin "
                            "files written by prepare")
    return out


class ShardSet:
    """Shards as one logical token array, memory-mapped, with checks against the tokenizer."""

    def __init__(self, paths: list[Path], *, tokenizer_name: str):
        if not paths:
            raise DataError("no shard files given")
        want = canonical_name(tokenizer_name)
        self.arrays, self.metas = [], []
        for path in paths:
            meta = read_meta(path)
            if meta["tokenizer"] != want:
                raise DataError(f"{path} was written by tokenizer {meta['tokenizer']!r} but this "
                                f"run uses {want!r}; set tokenizer_name to {meta['tokenizer']!r} "
                                "or re-run prepare with this tokenizer")
            if self.metas and (meta["vocab_size"], meta["eos_id"]) != (
                    self.metas[0]["vocab_size"], self.metas[0]["eos_id"]):
                raise DataError(f"{path}: vocab_size/eos_id differ from {paths[0]}; all shards "
                                "of a run must come from the same prepare settings")
            if meta["num_tokens"]:
                self.arrays.append(np.memmap(path, dtype=meta["dtype"], mode="r"))
            self.metas.append(meta)
        self.eos_id = int(self.metas[0]["eos_id"])
        self.vocab_size = int(self.metas[0]["vocab_size"])
        sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.num_tokens = int(self.starts[-1])

    def read_cyclic(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens from ``start`` of the shards read as a cycle (wrapping at the end)."""
        idx = (start + np.arange(length)) % self.num_tokens
        return np.concatenate([self.read(int(a), int(b - a)) for a, b in _runs(idx)])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated shards (may span shard files)."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[i])
        chunk = self.arrays[i][offset:offset + length]
        if len(chunk) == length:
            return chunk
        parts, need = [chunk], length - len(chunk)
        while need:
            i += 1
            parts.append(self.arrays[i][:need])
            need -= len(parts[-1])
        return np.concatenate(parts)


def _runs(idx: np.ndarray):
    """[start, stop) of the increasing runs of consecutive indices."""
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    for part in np.split(idx, cuts):
        yield part[0], part[-1] + 1
