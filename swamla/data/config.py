"""The data-pipeline configuration and its error type.

``DataConfig`` is frozen and validated once in ``__post_init__``; unknown keys given to
``from_dict``/``replace`` are errors naming the key. See ``docs/data.md`` for the
meaning of each source and how the train/validation split is made.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

SOURCES = ("fineweb-edu", "files", "shards")
TEXT_UNITS = ("document", "paragraph", "line")
RESUME_DATA = ("exact", "continue", "restart")
HUB_PREFIX = "hf:"  # a mixture entry streamed from the hub: hf:OWNER/NAME[/CONFIG]


class DataError(ValueError):
    """Data that cannot be read as configured; the message names the file or field and the fix."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it is split, tokenized and prefetched.

    source: ``fineweb-edu`` (streamed from the hub), ``files`` (local .txt/.jsonl/.parquet files or
        globs in ``train_paths``) or ``shards`` (directories or ``.bin`` files written by
        ``python -m swamla.data.prepare``).
    val_paths: explicit validation data of the same kind; when empty the validation split is the
        documents whose stable text hash falls below ``val_fraction`` (shards: the ``val_*.bin``
        files that ``prepare`` wrote beside the train shards).
    text_unit: what one document is in a ``.txt`` file: the whole file, a blank-line separated
        paragraph, or a line.
    streaming: read local files through ``datasets``' streaming mode (the machinery FineWeb uses)
        instead of a memory-mapped Arrow table.
    shuffle: shuffle training documents (text sources) or sequences (shards) each epoch from the
        loader's seed; validation is never shuffled.
    shuffle_buffer: buffer size of the streaming shuffle (text order of streamed sources).
    num_workers: tokenization processes; 0 tokenizes in the loader's background thread.
    prefetch: batches prepared ahead of the consumer.
    tokenize_chunk: the most documents read and tokenized together (batch encoding amortizes
        overhead); the first chunks of a loader are smaller, sized to its first batches.
    cache_dir: ``datasets`` cache for the Arrow copies of local files (None: its default).
    mixture: several training sources with weights, each ``LOCATION[:WEIGHT]`` (weight 1 when
        omitted): a shard directory or ``.bin`` files, local text files/globs/directories, or
        ``hf:OWNER/NAME[/CONFIG]`` streamed from the hub. Replaces ``source``/``train_paths``;
        each source's own validation split is mixed with the same weights (``mixture``).
    stream_timeout: seconds a streamed source may go without delivering a record before the run
        stops with an error naming the offline switches.
    resume_data: what a resumed run does when the checkpoint's data position was saved with
        another training source, block_size, global batch size or seed: ``exact`` refuses and
        names the change; ``continue`` keeps the position (the same data at a new path; another
        block_size or global batch from the same token position); ``restart`` starts this run's
        data from its beginning. Nothing changed: every mode resumes exactly.
    """

    source: str = "fineweb-edu"
    train_paths: tuple[str, ...] = ()
    val_paths: tuple[str, ...] = ()
    text_field: str = "text"
    text_unit: str = "document"
    dataset_name: str = "HuggingFaceFW/fineweb-edu"
    dataset_config: str = "CC-MAIN-2024-10"
    tokenizer_name: str = "openai-community/gpt2"
    val_fraction: float = 0.005
    streaming: bool = False
    shuffle: bool = True
    shuffle_buffer: int = 10_000
    num_workers: int = 4
    prefetch: int = 4
    tokenize_chunk: int = 512
    cache_dir: str | None = None
    mixture: tuple[str, ...] = ()
    stream_timeout: float = 120.0
    resume_data: str = "exact"

    def __post_init__(self):
        for name in ("train_paths", "val_paths", "mixture"):
            value = getattr(self, name)
            if isinstance(value, str):  # a single path, not a sequence of characters
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise DataError(f"{name} must be a list of path strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.source not in SOURCES:
            raise DataError(f"source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.mixture:
            for entry in self.mixture:
                parse_mixture_entry(entry)
            if self.train_paths or self.val_paths:
                raise DataError("mixture replaces source/train_paths, and each of its sources "
                                "brings its own validation split: drop train_paths/val_paths, or "
                                "drop mixture")
        elif self.source in ("files", "shards") and not self.train_paths:
            raise DataError(f"source={self.source!r} needs train_paths (files, globs or shard "
                            "directories); none were given")
        if self.text_unit not in TEXT_UNITS:
            raise DataError(f"text_unit must be one of {list(TEXT_UNITS)}, got {self.text_unit!r}")
        for name in ("text_field", "dataset_name", "dataset_config", "tokenizer_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise DataError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        v = self.val_fraction
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not 0.0 <= v < 1.0:
            raise DataError(f"val_fraction must be a number in [0, 1), got {v!r}")
        for name in ("streaming", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise DataError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, minimum in (("num_workers", 0), ("prefetch", 1), ("shuffle_buffer", 1),
                              ("tokenize_chunk", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
        t = self.stream_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise DataError(f"stream_timeout must be a number of seconds > 0, got {t!r}")
        if self.resume_data not in RESUME_DATA:
            raise DataError(f"resume_data must be one of {list(RESUME_DATA)}, got "
                            f"{self.resume_data!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise DataError(f"cache_dir must be a path string or null, got {self.cache_dir!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DataConfig":
        _check_known(data)
        return cls(**data)

    def replace(self, **overrides) -> "DataConfig":
        _check_known(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_mixture_entry(entry: str) -> tuple[str, float]:
    """``(location, weight)`` of a mixture entry ``LOCATION[:WEIGHT]``: the weight is the text
    after the last colon when it reads as a number, else 1."""
    location, sep, tail = entry.rpartition(":")
    try:
        weight = float(tail) if sep else None
    except ValueError:
        weight = None
    if weight is None:
        location, weight = entry, 1.0
    if not location or location == HUB_PREFIX:
        raise DataError(f"mixture entry {entry!r} names no source; write LOCATION[:WEIGHT], e.g. "
                        "shards/web:0.7 or hf:HuggingFaceFW/fineweb-edu/CC-MAIN-2024-10:0.3")
    if not (math.isfinite(weight) and weight > 0):
        raise DataError(f"mixture entry {entry!r}: the weight must be a number > 0, got {tail!r}")
    if location.startswith(HUB_PREFIX) and location[len(HUB_PREFIX):].count("/") not in (1, 2):
        raise DataError(f"mixture entry {entry!r}: a hub source is hf:OWNER/NAME or "
                        "hf:OWNER/NAME/CONFIG")
    return location, weight


def source_names(cfg: DataConfig) -> list[str]:
    """The names a data position records for the training data: one per source (a mixture's as
    ``LOCATION:WEIGHT``), compared when a run resumes."""
    if cfg.mixture:
        return [f"{loc}:{w:g}" for loc, w in map(parse_mixture_entry, cfg.mixture)]
    if cfg.source == "fineweb-edu":
        return [f"{HUB_PREFIX}{cfg.dataset_name}/{cfg.dataset_config}"]
    kind = "stream" if cfg.source == "files" and cfg.streaming else cfg.source
    return [f"{kind}:{','.join(cfg.train_paths)}"]


def _check_known(data: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DataError(f"unknown data config field(s) {unknown}; valid fields are {sorted(known)}")
