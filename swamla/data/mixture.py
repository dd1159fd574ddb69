"""Mixtures: several training sources with weights (``mixture``: ``LOCATION[:WEIGHT] ...``).

Every row of global batch b draws its source from the normalized weights with
``default_rng([seed, MIX_KEY, b])``, the same draws on every process at any process count, so
the global batch sequence depends only on the data, seed, weights, global rows and block size.

- A shards source gives the k-th row drawn from it (k counted over all rows of all batches, in
  row order) sequence ``permutation(seed, source, k // n)[k % n]`` of its n sequences.
- A text source gives row r the next ``block_size + 1`` tokens of its lane r, packed as
  ``packing`` describes: a lane advances only when its row draws that source.

The position is the batch index, each shards source's draw count and each text source's lanes;
the rows drawn per source are counted as tokens (``block_size`` per row) for the logs.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from swamla.data.config import HUB_PREFIX, DataConfig, DataError, parse_mixture_entry
from swamla.data.packing import LanePacker
from swamla.data.shards import ShardSet, find_shards
from swamla.data.sources import open_source, split_documents

MIX_KEY = 0x6D6978  # "mix": keeps the draws' stream apart from the epoch permutations


@dataclasses.dataclass(frozen=True)
class Part:
    """One source of a mixture: its location as written, weight, kind and own DataConfig."""

    location: str
    weight: float
    kind: str  # "shards" or "text"
    cfg: DataConfig


def parts(cfg: DataConfig) -> list[Part]:
    """The sources of ``cfg.mixture``, each as the single-source DataConfig that reads it."""
    out = []
    for entry in cfg.mixture:
        location, weight = parse_mixture_entry(entry)
        base = dataclasses.replace(cfg, mixture=())
        if location.startswith(HUB_PREFIX):
            owner, name, *config = location[len(HUB_PREFIX):].split("/")
            sub = dataclasses.replace(base, source="fineweb-edu", dataset_name=f"{owner}/{name}",
                                      dataset_config=config[0] if config else "default")
            out.append(Part(location, weight, "text", sub))
        elif location.endswith(".bin") or (Path(location).is_dir()
                                          and any(Path(location).glob("train_*.bin"))):
            out.append(Part(location, weight, "shards",
                            dataclasses.replace(base, source="shards", train_paths=(location,))))
        else:
            out.append(Part(location, weight, "text",
                            dataclasses.replace(base, source="files", train_paths=(location,))))
    return out


class _ShardRows:
    """Rows of one shards source by global draw index (module docstring)."""

    def __init__(self, part: Part, split: str, *, span: int, shuffle: bool, seed: int,
                 index: int):
        paths = find_shards(part.cfg.train_paths, split, field=f"mixture entry {part.location}")
        self.shards = ShardSet(paths, tokenizer_name=part.cfg.tokenizer_name)
        self.eos_id, self.span, self.shuffle, self.seed = self.shards.eos_id, span, shuffle, seed
        self.index = index
        self.n = self.shards.num_tokens // span
        self._epoch, self._order = None, None

    def row(self, k: int) -> np.ndarray:
        if self.n == 0:  # a split smaller than one row: read as a cycle of its tokens
            return self.shards.read_cyclic(k * self.span, self.span)
        epoch, i = divmod(k, self.n)
        if self._epoch != epoch:
            self._order = (np.random.default_rng([self.seed, self.index, epoch])
                           .permutation(self.n) if self.shuffle else np.arange(self.n))
            self._epoch = epoch
        return self.shards.read(int(self._order[i]) * self.span, self.span)


class _TextRows:
    """Rows of one text source from its lanes (module docstring)."""

    def __init__(self, part: Part, split: str, *, shuffle: bool, seed: int, index: int):
        self.source, self.rule = open_source(part.cfg, split, shuffle=shuffle,
                                             seed=seed + 7919 * index)
        self.split, self.packer = split, None

    def start(self, pos: dict, *, encoder, rows: range, global_rows: int, block_size: int,
              eos_id: int, chunk: int) -> None:
        if hasattr(self.source, "restore"):
            self.source.restore(pos.get("stream", []))
        documents = functools.partial(split_documents, self.source, split=self.split,
                                      rule=self.rule)
        self.packer = LanePacker(documents, encoder, rows=rows, global_rows=global_rows,
                                 block_size=block_size, eos_id=eos_id, chunk=chunk,
                                 lane_state={int(r): v for r, v in pos["lanes"].items()},
                                 base=tuple(pos.get("base", (0, 0, 0))))

    def position(self) -> dict:
        pos = {"lanes": self.packer.lane_state(), "base": list(self.packer.base)}
        stream = self.source.position(*self.packer.earliest())
        return {**pos, "stream": [stream] if stream else []}


class Mixture:
    """The sources of a mixture for one split and their batches (module docstring)."""

    def __init__(self, cfg: DataConfig, split: str, *, rows: range, global_rows: int,
                 block_size: int, shuffle: bool, seed: int):
        self.parts = parts(cfg)
        self.rows, self.global_rows, self.block_size = rows, global_rows, block_size
        self.span, self.seed = block_size + 1, seed
        weights = np.array([p.weight for p in self.parts], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.sources = [
            _ShardRows(p, split, span=self.span, shuffle=shuffle, seed=seed, index=i)
            if p.kind == "shards" else _TextRows(p, split, shuffle=shuffle, seed=seed, index=i)
            for i, p in enumerate(self.parts)]
        self.labels = [p.location for p in self.parts]

    @property
    def has_text(self) -> bool:
        return any(isinstance(s, _TextRows) for s in self.sources)

    def shard_eos(self) -> set[int]:
        return {s.eos_id for s in self.sources if isinstance(s, _ShardRows)}

    def initial(self) -> dict:
        return {"batch": 0, "sources": [{"draws": 0} if isinstance(s, _ShardRows) else
                                        {"lanes": {}, "base": [0, 0, 0], "stream": []}
                                        for s in self.sources]}

    def draws(self, batch: int) -> np.ndarray:
        """The source index of each of the global batch's rows."""
        return np.random.default_rng([self.seed, MIX_KEY, batch]).choice(
            len(self.weights), size=self.global_rows, p=self.weights)

    def batches(self, pos: dict, *, encoder, eos_id: int, chunk: int):
        """Endless ``(rows (B, T+1), position after them, rows drawn per source)``."""
        batch, subs = pos["batch"], pos["sources"]
        draws = [sub.get("draws", 0) for sub in subs]
        for source, sub in zip(self.sources, subs):
            if isinstance(source, _TextRows):
                source.start(sub, encoder=encoder, rows=self.rows, global_rows=self.global_rows,
                             block_size=self.block_size, eos_id=eos_id, chunk=chunk)
        while True:
            pick = self.draws(batch)
            out = np.empty((len(self.rows), self.span), dtype=np.uint32)
            for i, r in enumerate(self.rows):
                s = int(pick[r])
                source = self.sources[s]
                if isinstance(source, _ShardRows):
                    out[i] = source.row(draws[s] + int(np.count_nonzero(pick[:r] == s)))
                else:
                    source.packer.fill(r, out[i])
            counts = np.bincount(pick, minlength=len(self.sources))
            draws = [d + int(c) for d, c in zip(draws, counts)]
            batch += 1
            yield out, {"batch": batch, "sources": [
                {"draws": d} if isinstance(s, _ShardRows) else s.position()
                for s, d in zip(self.sources, draws)]}, counts


def check_eos(mixture: Mixture, eos_id: int | None) -> int:
    """The mixture's one EOS id: its shards' and its tokenizer's must agree."""
    ids = mixture.shard_eos() | ({eos_id} if eos_id is not None else set())
    if len(ids) != 1:
        raise DataError(f"the mixture's sources end documents with different EOS ids {sorted(ids)}; "
                        "prepare every shards source with this run's tokenizer_name")
    return ids.pop()
