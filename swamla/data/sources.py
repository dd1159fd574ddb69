"""Text document sources: local .txt/.jsonl/.parquet files and FineWeb-Edu streamed from the hub.

Every source is an endless sequence of epochs; ``iter_epoch(epoch, start)`` yields
``(raw_index, text)`` for the documents of one epoch in that epoch's (seeded) order, beginning at
``raw_index == start``, so a reader can restart anywhere with nothing but two integers.
``split_documents`` walks the epochs and keeps the documents of one split, numbering them with a
global document index ``g`` that the packer uses to give each document to exactly one row.

Train/validation split: with no explicit validation paths, a document is in ``val`` iff the
blake2b hash of its text, read as a fraction of 2**64, is below ``val_fraction``. A local corpus
in which no document hashes that low (a few dozen documents at 0.5%) holds out its last document
instead, when it has two or more. The split depends only on the text, so it is the same for every
seed, epoch order, process count and for ``prepare``.

Streamed sources are read shard (file) by shard, in a seeded shard order per epoch, and in
windows of ``shuffle_buffer`` records, each shuffled on its own (seed, epoch, window). The position
of each window's start (shard, record in it) is kept, so a restart opens that shard
(``IterableDataset.shard``) and skips within it, instead of re-reading the stream from its start.

``datasets`` is imported lazily, so the pre-tokenized shard path works without it.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

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


_STALL_HINT = (
    "If the network is down or the hub unreachable, set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 "
    "and train on local data (--source files or --source shards); on a slow link raise "
    "--stream_timeout")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def is_val_document(text: str, val_fraction: float) -> bool:
    """The stable hash split: True for the ~val_fraction of documents held out for validation."""
    if val_fraction <= 0.0:
        return False
    return int.from_bytes(_digest(text), "little") < val_fraction * 2.0 ** 64


class HashSplit:
    """The train/validation split of one source: the hash split, plus the held-out document of a
    corpus too small for the hash to pick one (``held_out``, the digest of its text)."""

    def __init__(self, val_fraction: float, held_out: bytes | None = None):
        self.val_fraction, self.held_out = val_fraction, held_out

    def is_val(self, text: str) -> bool:
        return is_val_document(text, self.val_fraction) or (
            self.held_out is not None and _digest(text) == self.held_out)


def hash_split(source, val_fraction: float) -> HashSplit:
    """``source``'s split: reads its documents in file order up to the first one the hash holds
    out (about 1/val_fraction of them); a corpus with none holds out its last document."""
    if val_fraction <= 0.0:
        return HashSplit(0.0)
    count, last = 0, None
    for text in source.texts():
        if is_val_document(text, val_fraction):
            return HashSplit(val_fraction)
        count, last = count + 1, text
    if count < 2:  # nothing to spare: the one document trains
        return HashSplit(val_fraction)
    logger.info("%s: no document hashes into the %g validation fraction; holding out its last "
                "document for validation", source.label, val_fraction)
    return HashSplit(val_fraction, _digest(last))


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

    def texts(self) -> Iterator[str]:
        """The documents in file order (checked as ``iter_epoch`` checks them)."""
        for lo in range(0, len(self.data), 1024):
            for i, text in enumerate(self.data[lo:lo + 1024]["text"]):
                yield _check_text(text, self.label, self.field, lo + i)

    def position(self, epoch: int, raw: int) -> None:
        """Random access: a restart needs no saved position."""
        return None

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

    ``opener(epoch)`` opens the stream (``epoch=None``: read in the order given, for ``texts``).
    Records are read in windows of ``window`` records by a background thread; each window is
    shuffled with (seed, epoch, window index), and the stream's position at its start is kept in
    ``positions`` (the module docstring). Transient network errors reopen the stream at the
    current window after a backoff; no record for ``timeout`` seconds is an error naming the
    offline switches.
    """

    _KEPT_POSITIONS = 1024  # window starts remembered: far more than the lanes ever lag behind

    def __init__(self, opener: Callable[[int | None], Any], *, label: str, field: str,
                 shuffle: bool, seed: int, window: int, timeout: float):
        self.opener, self.label, self.field = opener, label, field
        self.shuffle, self.seed, self.window, self.timeout = shuffle, seed, window, timeout
        self.transient = _transient_errors()
        self.positions: collections.OrderedDict[tuple[int, int], Any] = collections.OrderedDict()
        self.warned = False

    # ------------------------------------------------------------------ positions
    def position(self, epoch: int, raw: int) -> list | None:
        """``[epoch, window start, [shard position, record in shard]]`` of the window holding
        record ``raw``, or None if that window's position is unknown (the stream cannot seek)."""
        start = raw - raw % self.window
        state = self.positions.get((epoch, start))
        return None if state is None else [epoch, start, state]

    def restore(self, positions) -> None:
        """Adopt positions saved by ``position`` (a resumed run restarts at the latest one
        before its first record)."""
        for epoch, start, state in positions:
            self._remember(int(epoch), int(start), state)

    def _remember(self, epoch: int, start: int, state) -> None:
        self.positions[(epoch, start)] = state
        self.positions.move_to_end((epoch, start))
        while len(self.positions) > self._KEPT_POSITIONS:
            self.positions.popitem(last=False)

    # ------------------------------------------------------------------ reading
    def texts(self) -> Iterator[str]:
        """The documents in file order (for the held-out document of a small corpus)."""
        for _, _, records in self._windows(None, None, 0):
            for record in records:
                _check_field(record.keys(), self.label, self.field)
                yield _check_text(record.get(self.field), self.label, self.field, -1)

    def iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[int, str]]:
        first = start - start % self.window
        known = [s for e, s in self.positions if e == epoch and s <= first]
        begin = max(known, default=0)
        if first and not known and not self.warned:
            logger.warning("%s: no saved stream position for record %d of epoch %d (the source "
                           "cannot seek, or the state predates saved positions); re-reading the "
                           "stream from its start", self.label, start, epoch)
            self.warned = True
        checked = False
        windows = self._windows(epoch, self.positions.get((epoch, begin)) if begin else None,
                                begin)
        try:
            for lo, state, records in windows:
                if state is not None:
                    self._remember(epoch, lo, state)
                if lo + len(records) <= start:
                    continue
                order = (np.random.default_rng([self.seed, epoch, lo // self.window])
                         .permutation(len(records)) if self.shuffle else range(len(records)))
                for i in range(max(start - lo, 0), len(records)):
                    record = records[order[i]]
                    if not checked:
                        _check_field(record.keys(), self.label, self.field)
                        checked = True
                    yield lo + i, _check_text(record.get(self.field), self.label, self.field,
                                              lo + i)
        finally:
            windows.close()

    def _windows(self, epoch, state, begin: int):
        """``(first record, datasets state before it, records)`` per window from ``begin``
        (``state``: the position there, or None to read from the stream's start), read ahead by
        a background thread."""
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        beat = [time.monotonic()]  # when the reader last made progress
        thread = threading.Thread(target=self._reader, args=(epoch, state, begin, q, stop, beat),
                                  name="swamla-stream", daemon=True)
        thread.start()
        try:
            while True:
                waiting = time.monotonic()
                while True:
                    try:
                        item = q.get(timeout=min(1.0, self.timeout))
                        break
                    except queue.Empty:
                        idle = time.monotonic() - max(beat[0], waiting)
                        if idle > self.timeout:
                            raise DataError(
                                f"{self.label}: no data from the stream for {idle:.0f} s (the "
                                f"network or the hub stalled). {_STALL_HINT}") from None
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    return
                yield item
                if len(item[2]) < self.window:
                    return
        finally:
            stop.set()

    def _reader(self, epoch, state, begin: int, q: queue.Queue, stop: threading.Event,
                beat: list) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    beat[0] = time.monotonic()
                    return True
                except queue.Full:
                    continue
            return False

        lo, failures = begin, 0
        while not stop.is_set():
            try:
                records = self._records(epoch, state, 0 if state is not None else lo, beat)
                while True:
                    window, state = [], None
                    for where, record in records:
                        state = state or where
                        window.append(record)
                        beat[0] = time.monotonic()
                        if len(window) == self.window:
                            break
                    failures = 0
                    if not put((lo, state, window)) or len(window) < self.window:
                        return
                    lo, state = lo + len(window), None
            except UnicodeDecodeError as e:
                put(_read_error(self.label, e))
                return
            except self.transient as e:
                failures += 1
                if failures > _STREAM_RETRIES:
                    put(DataError(f"{self.label}: stream failed {failures} times in a row at "
                                  f"record {lo} ({e}). {_OFFLINE_HINT}"))
                    return
                delay = 2.0 ** (failures - 1)
                logger.warning("%s: %s at record %d; retrying in %.0f s (%d/%d)", self.label,
                               e, lo, delay, failures, _STREAM_RETRIES)
                stop.wait(delay)
                state = self.positions.get((epoch, lo)) if epoch is not None else None
            except BaseException as e:  # handed to the consumer, which raises it
                put(e)
                return

    def _records(self, epoch, state, skip: int, beat: list):
        """``([shard position, record in shard], record)`` from ``state`` (None: the start,
        then ``skip`` records are read and dropped: the replay of a source that cannot seek).
        The shards (files) of a shuffled epoch come in a seeded order."""
        ds = self.opener(epoch)
        n = getattr(ds, "num_shards", None) or getattr(ds, "n_shards", None)
        if not n or not hasattr(ds, "shard"):  # cannot seek: one stream, no positions
            for i, record in enumerate(ds):
                if i >= skip:
                    yield None, record
                beat[0] = time.monotonic()
            return
        order = (np.random.default_rng([self.seed, epoch]).permutation(n)
                 if self.shuffle and epoch is not None else np.arange(n))
        first, within = state if state is not None else (0, 0)
        for k in range(first, n):
            part = ds.shard(num_shards=n, index=int(order[k]), contiguous=True)
            start = within if k == first else 0
            for j, record in enumerate(part.skip(start) if start else part, start=start):
                if skip:
                    skip -= 1
                    beat[0] = time.monotonic()
                    continue
                yield [k, j], record


def fineweb_source(cfg: DataConfig, *, shuffle: bool, seed: int) -> StreamingSource:
    """FineWeb-Edu (or ``cfg.dataset_name``) streamed from the hub; a clear error when offline."""
    if not hub_reachable():
        raise DataError(f"cannot stream {cfg.dataset_name} ({cfg.dataset_config}): the Hugging "
                        "Face hub is unreachable or HF_HUB_OFFLINE is set. " + _OFFLINE_HINT)
    datasets = _datasets()

    def opener(epoch):
        return datasets.load_dataset(cfg.dataset_name, name=cfg.dataset_config, split="train",
                                     streaming=True)
    return StreamingSource(opener, label=f"{cfg.dataset_name}/{cfg.dataset_config}",
                           field=cfg.text_field, shuffle=shuffle, seed=seed,
                           window=cfg.shuffle_buffer, timeout=cfg.stream_timeout)


def local_stream_source(paths: list[Path], cfg: DataConfig, *, shuffle: bool,
                        seed: int) -> StreamingSource:
    """Local files through ``datasets``' streaming mode (the FineWeb machinery, no Arrow copy)."""
    builders = {BUILDERS[p.suffix] for p in paths}
    if len(builders) > 1:
        raise DataError(f"streaming local files needs one file type, got {sorted(builders)} in "
                        f"{[str(p) for p in paths]}; stream them separately or set streaming=false")
    builder, kwargs = _builder_kwargs(paths[0], cfg)
    datasets = _datasets()

    kwargs["data_files"] = [str(p) for p in paths]

    def opener(epoch):
        return datasets.load_dataset(builder, streaming=True, **kwargs)
    return StreamingSource(opener, label=", ".join(map(str, paths)),
                           field="text" if builder == "text" else cfg.text_field,
                           shuffle=shuffle, seed=seed, window=cfg.shuffle_buffer,
                           timeout=cfg.stream_timeout)


def open_source(cfg: DataConfig, split: str, *, shuffle: bool, seed: int):
    """The document source of ``split`` and its ``HashSplit`` (None when the split is by file:
    ``val_paths``)."""
    if split == "val" and cfg.val_paths:
        field, hashed = "val_paths", False
    elif cfg.source == "fineweb-edu":  # never too small for the hash split
        return fineweb_source(cfg, shuffle=shuffle, seed=seed), HashSplit(cfg.val_fraction)
    else:
        field, hashed = "train_paths", True
    paths = expand_paths(getattr(cfg, field), field=field)
    if split == "val" and hashed and cfg.val_fraction == 0.0:
        raise DataError("split='val' needs validation data: set val_paths (--val_paths) or "
                        "val_fraction > 0")
    if cfg.streaming:
        source = local_stream_source(paths, cfg, shuffle=shuffle, seed=seed)
    else:
        source = LocalFiles(paths, cfg, shuffle=shuffle, seed=seed, paths_field=field)
    return source, hash_split(source, cfg.val_fraction) if hashed else None


def split_documents(source, *, split: str, rule: HashSplit | None, epoch: int = 0, raw: int = 0,
                    g: int = 0) -> Iterator[tuple[int, int, int, str]]:
    """Endless ``(g, epoch, raw, text)`` over the documents of ``split``, from a restart point;
    ``rule`` is the source's hash split (None: every document is in ``split``)."""
    want_val = split == "val"
    while True:
        full_epoch, found, has_text = raw == 0, False, False
        # raw: the restart point going in, then the position reached (read after the loop)
        for raw, text in source.iter_epoch(epoch, raw):  # noqa: B020
            if rule is not None and rule.is_val(text) != want_val:
                continue
            found, has_text = True, has_text or bool(text)
            yield g, epoch, raw, text
            g += 1
        if full_epoch and not found:
            fix = ("it has fewer than two documents, so none can be held out: give validation "
                   "data with --val_paths (for a .txt file, --text_unit paragraph or line cuts it "
                   "into more documents)" if want_val else
                   "every document is held out for validation: lower --val_fraction or add "
                   "documents")
            raise DataError(f"{source.label}: no documents in the {split!r} split; {fix}")
        if full_epoch and not has_text:  # the rows would be nothing but EOS tokens
            raise DataError(f"{source.label}: every document of the {split!r} split is empty "
                            "(its batches would hold nothing but EOS tokens); check text_field "
                            "and that the files hold text")
        epoch, raw = epoch + 1, 0
