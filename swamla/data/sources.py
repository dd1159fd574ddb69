"""Text document sources: local .txt/.jsonl/.parquet files and FineWeb-Edu streamed from the hub.

Every source is an endless sequence of epochs; ``iter_epoch(epoch, start)`` yields
``(raw_index, text)`` for the documents of one epoch in that epoch's (seeded) order, beginning at
``raw_index == start``, so a reader can restart anywhere with nothing but two integers.
``split_documents`` walks the epochs and keeps the documents of one split, numbering them with a
global document index ``g`` that the packer uses to give each document to exactly one row.

Train/validation split: with no explicit validation paths, a document is in ``val`` iff the
blake2b hash of its text, read as a fraction of 2**64, is below ``val_fraction``. The hash depends
only on the text, so the split is the same for every seed, epoch order, process count and for
``prepare``.

``datasets`` is imported lazily, so the pre-tokenized shard path works without it.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from swamla.data.config import DataConfig, DataError
from swamla.tokenizer import hub_reachable

logger = logging.getLogger(__name__)

BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet"}
_STREAM_RETRIES = 6  # backoff 1, 2, 4, ... 32 s: about a minute of outage before giving up
_OFFLINE_HINT = (
    "To train without network use local data: --source files --train-paths 'corpus/*.jsonl' "
    "(.txt, .jsonl or .parquet; --text-field names the JSON/Parquet column), or pre-tokenized "
    "shards: python -m swamla.data.prepare --source files --train-paths ... --out DIR, then "
    "--source shards --train-paths DIR")


def is_val_document(text: str, val_fraction: float) -> bool:
    """The stable hash split: True for the ~val_fraction of documents held out for validation."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0 ** 64


def expand_paths(patterns: tuple[str, ...], *, field: str, suffixes=tuple(BUILDERS)) -> list[Path]:
    """Files named by paths, globs or directories (their files with a known suffix), in order."""
    out: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"{field}: glob {pattern!r} matches no files; check the path")
        elif Path(pattern).is_dir():
            matches = sorted(p for p in Path(pattern).iterdir() if p.suffix in suffixes)
            if not matches:
                raise DataError(f"{field}: directory {pattern} holds no {'/'.join(suffixes)} files")
        elif Path(pattern).is_file():
            matches = [Path(pattern)]
        else:
            raise DataError(f"{field}: {pattern} does not exist; check the path")
        out.extend(matches)
    for path in out:
        if path.suffix not in suffixes:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                            f"{list(suffixes)}")
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty; remove it from {field} or fill it")
    return out


def _no_text(path: Path, field: str) -> DataError:
    return DataError(f"{path} holds no text (only blank lines, or records without text); remove "
                     f"it from {field} or fill it")


def _holds_text(ds, column: str) -> bool:
    """Whether any record has text that is not whitespace (a non-string counts as text here: its
    own error comes when it is read). Usually decided by the first record."""
    for lo in range(0, len(ds), 1024):
        if any(not isinstance(t, str) or t.strip() for t in ds[lo:lo + 1024][column]):
            return True
    return False


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError("reading text needs the 'datasets' package (pip install datasets); "
                        "pre-tokenized shards (--source shards) do not") from e
    datasets.disable_progress_bars()
    return datasets


def _builder_kwargs(path: Path, cfg: DataConfig) -> tuple[str, dict]:
    builder = BUILDERS[path.suffix]
    kwargs = {"data_files": [str(path)], "split": "train"}
    if builder == "text":
        kwargs["sample_by"] = cfg.text_unit
    return builder, kwargs


def _check_field(columns, label: str, field: str) -> None:
    if columns is not None and field not in columns:
        raise DataError(f"{label}: records have no field {field!r} (fields: {sorted(columns)}); "
                        "set text_field (--text-field) to the column holding the text")


def _check_text(text, label: str, field: str, raw: int) -> str:
    if not isinstance(text, str):
        raise DataError(f"{label}: record {raw} has {field}={text!r}, not a string; fix or drop "
                        "that record")
    return text


class LocalFiles:
    """Local files as one memory-mapped Arrow table; epochs are seeded permutations of it."""

    def __init__(self, paths: list[Path], cfg: DataConfig, *, shuffle: bool, seed: int,
                 paths_field: str = "train_paths"):
        datasets = _datasets()
        parts = []
        for path in paths:
            builder, kwargs = _builder_kwargs(path, cfg)
            field = "text" if builder == "text" else cfg.text_field
            try:
                ds = datasets.load_dataset(builder, cache_dir=cfg.cache_dir, **kwargs)
            except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as e:
                raise _read_error(path, e) from e
            except ValueError as e:  # datasets' words for a file of records without columns
                if "corresponds to no data" not in str(e):
                    raise
                raise _no_text(path, paths_field) from None
            _check_field(ds.column_names, str(path), field)
            _check_utf8(ds, field, path)
            if not _holds_text(ds, field):
                raise _no_text(path, paths_field)
            parts.append(ds.select_columns([field]).rename_column(field, "text")
                         if field != "text" else ds.select_columns(["text"]))
        self.data = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        self.label = ", ".join(map(str, paths))
        self.field = cfg.text_field
        self.shuffle, self.seed = shuffle, seed

    def iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[int, str]]:
        n = len(self.data)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        step = 1024
        for lo in range(start, n, step):
            texts = self.data[order[lo:lo + step].tolist()]["text"]
            for i, text in enumerate(texts):
                yield lo + i, _check_text(text, self.label, self.field, int(order[lo + i]))


def _check_utf8(ds, field: str, path: Path) -> None:
    # Arrow's JSON reader stores bytes unchecked; a bad byte would only fail mid-training.
    import pyarrow as pa

    try:
        ds.data.table.column(field).validate(full=True)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: bytes are not valid UTF-8 in field {field!r} ({e}); re-encode "
                        "the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove the bad "
                        "bytes") from e


def _read_error(label, e: BaseException) -> DataError:
    cause = e
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return DataError(f"{label}: bytes are not valid UTF-8 ({cause}); re-encode the file as "
                         "UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove the bad bytes")
    root = e.__cause__ or e
    return DataError(f"{label}: could not be parsed: {type(root).__name__}: {root}; check "
                     "that the file matches its suffix (.txt, .jsonl, .parquet)")


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("requests", "RequestException"), ("httpx", "TransportError"),
                         ("aiohttp", "ClientError"), ("fsspec.exceptions", "FSTimeoutError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):  # that HTTP client is not installed: nothing to add
            pass
    return tuple(errors)


class StreamingSource:
    """A ``datasets`` streaming (IterableDataset) source: FineWeb-Edu, or local files streamed.

    Epoch order is the dataset's shard order shuffled with a buffer (seed + epoch). Transient
    network errors restart the stream at the current record after a backoff.
    """

    def __init__(self, opener: Callable[[], object], *, label: str, field: str, shuffle: bool,
                 seed: int, buffer_size: int):
        self.opener, self.label, self.field = opener, label, field
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.transient = _transient_errors()

    def _open(self, epoch: int, start: int):
        ds = self.opener()
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer_size)
            ds.set_epoch(epoch)
        return ds.skip(start) if start else ds

    def iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[int, str]]:
        raw, failures = start, 0
        while True:
            try:
                for record in self._open(epoch, raw):
                    if raw == start:
                        _check_field(record.keys(), self.label, self.field)
                    yield raw, _check_text(record.get(self.field), self.label, self.field, raw)
                    raw, failures = raw + 1, 0
                return
            except UnicodeDecodeError as e:
                raise _read_error(self.label, e) from e
            except self.transient as e:
                failures += 1
                if failures > _STREAM_RETRIES:
                    raise DataError(f"{self.label}: stream failed {failures} times in a row at "
                                    f"record {raw} ({e}). {_OFFLINE_HINT}") from e
                delay = 2.0 ** (failures - 1)
                logger.warning("%s: %s at record %d; retrying in %.0f s (%d/%d)", self.label,
                               e, raw, delay, failures, _STREAM_RETRIES)
                time.sleep(delay)


def fineweb_source(cfg: DataConfig, *, shuffle: bool, seed: int) -> StreamingSource:
    """FineWeb-Edu (or ``cfg.dataset_name``) streamed from the hub; a clear error when offline."""
    if not hub_reachable():
        raise DataError(f"cannot stream {cfg.dataset_name} ({cfg.dataset_config}): the Hugging "
                        "Face hub is unreachable or HF_HUB_OFFLINE is set. " + _OFFLINE_HINT)
    datasets = _datasets()

    def opener():
        return datasets.load_dataset(cfg.dataset_name, name=cfg.dataset_config, split="train",
                                     streaming=True)
    return StreamingSource(opener, label=f"{cfg.dataset_name}/{cfg.dataset_config}",
                           field=cfg.text_field, shuffle=shuffle, seed=seed,
                           buffer_size=cfg.shuffle_buffer)


def local_stream_source(paths: list[Path], cfg: DataConfig, *, shuffle: bool,
                        seed: int) -> StreamingSource:
    """Local files through ``datasets``' streaming mode (the FineWeb machinery, no Arrow copy)."""
    builders = {BUILDERS[p.suffix] for p in paths}
    if len(builders) > 1:
        raise DataError(f"streaming local files needs one file type, got {sorted(builders)} in "
                        f"{[str(p) for p in paths]}; stream them separately or set streaming=false")
    builder, kwargs = _builder_kwargs(paths[0], cfg)
    kwargs["data_files"] = [str(p) for p in paths]
    datasets = _datasets()
    return StreamingSource(lambda: datasets.load_dataset(builder, streaming=True, **kwargs),
                           label=", ".join(map(str, paths)),
                           field="text" if builder == "text" else cfg.text_field,
                           shuffle=shuffle, seed=seed, buffer_size=cfg.shuffle_buffer)


def open_source(cfg: DataConfig, split: str, *, shuffle: bool, seed: int):
    """The document source of ``split`` and whether the hash split must still be applied."""
    if split == "val" and cfg.val_paths:
        field, hashed = "val_paths", False
    elif cfg.source == "fineweb-edu":
        return fineweb_source(cfg, shuffle=shuffle, seed=seed), True
    else:
        field, hashed = "train_paths", True
    paths = expand_paths(getattr(cfg, field), field=field)
    if split == "val" and hashed and cfg.val_fraction == 0.0:
        raise DataError("split='val' needs validation data: set val_paths or val_fraction > 0")
    if cfg.streaming:
        return local_stream_source(paths, cfg, shuffle=shuffle, seed=seed), hashed
    return LocalFiles(paths, cfg, shuffle=shuffle, seed=seed, paths_field=field), hashed


def split_documents(source, *, split: str, hashed: bool, val_fraction: float, epoch: int = 0,
                    raw: int = 0, g: int = 0) -> Iterator[tuple[int, int, int, str]]:
    """Endless ``(g, epoch, raw, text)`` over the documents of ``split``, from a restart point."""
    want_val = split == "val"
    while True:
        full_epoch, found, has_text = raw == 0, False, False
        # raw: the restart point going in, then the position reached (read after the loop)
        for raw, text in source.iter_epoch(epoch, raw):  # noqa: B020
            if hashed and is_val_document(text, val_fraction) != want_val:
                continue
            found, has_text = True, has_text or bool(text)
            yield g, epoch, raw, text
            g += 1
        if full_epoch and not found:
            raise DataError(f"{source.label}: no documents in the {split!r} split; add data, or "
                            "for the hash split adjust val_fraction (or give val_paths)")
        if full_epoch and not has_text:  # the rows would be nothing but EOS tokens
            raise DataError(f"{source.label}: every document of the {split!r} split is empty "
                            "(its batches would hold nothing but EOS tokens); check text_field "
                            "and that the files hold text")
        epoch, raw = epoch + 1, 0
