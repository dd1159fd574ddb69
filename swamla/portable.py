"""The portable checkpoint format (SPEC.md section 7): names, shapes, and safetensors I/O.

Tensors are numpy arrays in the PyTorch ``[out, in]`` layout under the PyTorch parameter names.
Each backend converts its own parameters to and from this dict; this module checks the key set,
every shape and dtype against the config, and writes the directory atomically (a kill mid-save
leaves the previous checkpoint untouched; ``remove_stale_temporaries`` clears what the kill left).
A save replaces only an artifact of its own kind, never a run directory or an unrelated folder.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import re
import secrets
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from swamla.config import ConfigError, ModelConfig
from swamla.layout import expected_shapes

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold a valid SWA-MLA model for its config."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (full disk, no permission). Nothing was replaced and
    the partial write was removed; ``errno`` is that of the cause, when it had one."""


def check_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig, source: str) -> None:
    """Raise CheckpointError naming every missing, extra or mis-shaped tensor."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: {tuple(tensors[k].shape)} != expected {expected[k]}"
             for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {_abbrev(missing)}")
    if extra:
        problems.append(f"unexpected tensors {_abbrev(extra)}")
    if wrong:
        problems.append(f"mis-shaped tensors {_abbrev(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config.json: " + "; ".join(problems)
                              + ". Was the checkpoint written for another config, or the "
                              "config.json edited?")


def _abbrev(items, n=6):
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def apply_overrides(cfg: ModelConfig, overrides: dict, source: str) -> ModelConfig:
    """``cfg`` with a loader's ``config_overrides``, which may change only what no weight depends
    on (block_size, dropout...): one that changes a tensor's shape is refused as the caller's
    mistake (the checkpoint's tensors would otherwise be blamed for not matching)."""
    if not overrides:
        return cfg
    new = cfg.replace(**overrides)
    before = expected_shapes(cfg)
    if expected_shapes(new) == before:
        return new
    bad = [k for k in overrides if expected_shapes(cfg.replace(**{k: overrides[k]})) != before]
    raise CheckpointError(
        "override " + ", ".join(f"{k}={overrides[k]!r} (checkpoint: {getattr(cfg, k)!r})"
                                for k in (bad or overrides))
        + f" changes the shapes of the weights in {source}: drop it (only fields no weight "
        "depends on, such as block_size or dropout, can be overridden when loading)")


def save_portable(tensors: dict[str, np.ndarray], cfg: ModelConfig, directory: str | Path, *,
                  dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``config.json`` and the safetensors weights into ``directory`` atomically.

    An existing ``directory`` is replaced only if it is empty or a portable checkpoint (not a
    training state, whose optimizer state would be lost); anything else is a CheckpointError.
    """
    check_tensors(tensors, cfg, "the model being saved")
    with atomic_directory(directory, what="portable checkpoint",
                          is_same_kind=is_weights_checkpoint) as tmp:
        write_portable(tensors, cfg, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return Path(directory)


def check_destination(path: str | Path, what: str, is_same_kind: Callable[[Path], bool], *,
                      overwrite: bool) -> None:
    """Refuse to write a ``what`` at ``path`` over anything but another ``what``.

    A missing path or an empty directory is always fine. Something that ``is_same_kind`` says is
    a ``what`` needs ``overwrite`` (the CLIs' ``--overwrite``); anything else (a run directory, an
    unrelated folder, a file) is never replaced.
    """
    path = Path(path)
    if not os.path.lexists(path) or (path.is_dir() and not path.is_symlink()
                                     and not any(path.iterdir())):
        return
    if not is_same_kind(path):
        raise CheckpointError(f"refusing to write a {what} at {path}: it exists, is not empty "
                              f"and is not a {what} (only a {what} is ever replaced by one). "
                              "Choose a new destination, or move it away yourself")
    if not overwrite:
        raise CheckpointError(f"{path} already holds a {what}; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_directory(directory: str | Path, *, what: str, is_same_kind: Callable[[Path], bool]):
    """Yield a new temporary sibling of ``directory`` that replaces it once the block completes.

    ``what`` names the artifact written ("portable checkpoint") and ``is_same_kind`` recognizes
    one: see ``check_destination`` (with overwrite) for what may be replaced. A crash, kill or full
    disk inside the block leaves ``directory`` as it was. On an error the temporary is removed
    and an OSError is re-raised as a CheckpointWriteError naming ``directory``; a kill leaves the
    temporary, for ``remove_stale_temporaries``. The result has the permissions a plain
    ``mkdir``/``open`` gives under the process umask.
    """
    directory = Path(directory)
    with _staged(directory, what, is_same_kind, lambda tmp: _replace_dir(tmp, directory)) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(path: str | Path, *, what: str, is_same_kind: Callable[[Path], bool]):
    """``atomic_directory`` for an artifact that is one file: yield the path to write it at (in
    a temporary sibling directory); it replaces ``path`` once the block completes."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"refusing to write a {what} at {path}: it is a directory, and a "
                              f"{what} is one file")

    def install(tmp: Path):
        os.replace(tmp / path.name, path)
        _fsync(path.parent)

    with _staged(path, what, is_same_kind, install) as tmp:
        yield tmp / path.name


@contextlib.contextmanager
def _staged(destination: Path, what: str, is_same_kind: Callable[[Path], bool],
            install: Callable[[Path], None]):
    """The shared body of the atomic writers: check ``destination``, yield a new temporary
    sibling directory, then flush it and ``install`` it; on an error remove it and re-raise an
    OSError as a CheckpointWriteError naming ``destination``."""
    check_destination(destination, what, is_same_kind, overwrite=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(destination, "tmp")
    tmp.mkdir()  # a plain mkdir, so the umask's permissions (tempfile.mkdtemp's are always 0700)
    try:
        yield tmp
        _finish_tree(tmp)
        install(tmp)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        raise _write_error(destination, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once tmp has been moved into place


def _write_error(destination: Path, cause: BaseException) -> CheckpointWriteError:
    error = CheckpointWriteError(
        f"could not write {destination}: {cause}. Nothing was replaced: {destination} (if it "
        "existed) and the checkpoints beside it are intact, and the partial write was removed")
    error.errno = getattr(cause, "errno", None)
    return error


# A temporary of atomic_directory / atomic_file: ".NAME.tmp-XXXX" while written, ".NAME.old-XXXX"
# for the replaced NAME until it is deleted (mkdtemp's suffixes, of earlier versions, included).
_SIBLING = re.compile(r"\.(?P<name>.+)\.(?P<role>tmp|old)-[0-9a-z_]+")


def _sibling(path: Path, role: str) -> Path:
    return path.with_name(f".{path.name}.{role}-{secrets.token_hex(4)}")


def remove_stale_temporaries(parent: str | Path) -> list[Path]:
    """Clear what ``atomic_directory``/``atomic_file`` leave in ``parent`` when a kill stops a save.

    ``.NAME.tmp-*`` (a save that never completed) is removed. ``.NAME.old-*`` (a replaced NAME,
    killed before it was deleted) is removed if NAME exists, and otherwise, the kill having come
    between the two renames of the swap, renamed back to NAME, the last complete save. Nothing
    else is touched. Call it only while nothing is saving into ``parent`` (a trainer's startup).
    Returns the paths removed.
    """
    parent = Path(parent)
    removed = []
    for path in sorted(parent.iterdir()) if parent.is_dir() else ():
        m = _SIBLING.fullmatch(path.name)
        if not m or not path.is_dir() or path.is_symlink():
            continue
        if m["role"] == "old" and not os.path.lexists(parent / m["name"]):
            os.replace(path, parent / m["name"])
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


def write_portable(tensors: dict[str, np.ndarray], cfg: ModelConfig, directory: Path, *,
                   dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """The files of a portable checkpoint into an existing (temporary) directory."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    # .copy(order="C") rather than np.ascontiguousarray, which turns a 0-d DyT alpha into 1-d.
    arrays = {k: np.asarray(v, dtype=np.float32).astype(_DTYPES[dtype]).copy(order="C")
              for k, v in tensors.items()}
    shards = [{k: arrays[k] for k in shard}
              for shard in _split_shards({k: a.nbytes for k, a in arrays.items()},
                                         max_shard_bytes)]
    meta = {"format": "pt", "swamla_format_version": "1"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata=meta)
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(a.nbytes for a in arrays.values())
        (directory / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save(directory / CONFIG_NAME)


# ------------------------------------------------------------------ streamed writing
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}


def write_safetensors_streamed(path: Path, specs: Sequence[tuple[str, tuple[int, ...]]],
                               read: Callable[[str], np.ndarray], *, dtype: str = "float32",
                               metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of the tensors ``specs`` names (name, shape), written one at a time:
    ``read(name)`` is called once per tensor, in ``specs`` order, and its array is dropped once
    written, so the file never needs its tensors in memory together. The header, known from the
    shapes, goes first (safetensors' layout: header length, JSON header padded to 8 bytes, data).
    """
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    header, offset = {"__metadata__": dict(metadata or {})}, 0
    for name, shape in specs:
        end = offset + int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in specs:
            array = np.asarray(read(name))
            if tuple(array.shape) != tuple(shape):
                raise CheckpointError(f"{name}: shape {tuple(array.shape)} != expected "
                                      f"{tuple(shape)} while writing {path}")
            # .copy(order="C") rather than np.ascontiguousarray, which turns 0-d arrays 1-d.
            f.write(array.astype(_DTYPES[dtype]).copy(order="C").reshape(-1).view(np.uint8).data)


def write_portable_streamed(shapes: dict[str, tuple[int, ...]], read: Callable[[str], np.ndarray],
                            cfg: ModelConfig, directory: Path, *, dtype: str = "float32",
                            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """``write_portable`` one tensor at a time: the weights named in ``shapes`` come from
    ``read(name)`` (once each, in sorted order) and are written as they come, into shards of at
    most ``max_shard_bytes``, as ``write_portable`` splits them."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    sizes = {k: int(np.prod(s, dtype=np.int64)) * itemsize for k, s in shapes.items()}
    shards = _split_shards(sizes, max_shard_bytes)
    meta = {"format": "pt", "swamla_format_version": "1"}
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        write_safetensors_streamed(directory / name, [(k, tuple(shapes[k])) for k in shard], read,
                                   dtype=dtype, metadata=meta)
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        (directory / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
            indent=2))
    cfg.save(directory / CONFIG_NAME)


def weight_files(directory: str | Path) -> list[str]:
    """The names of the files holding a portable checkpoint's weights (and its index)."""
    directory = Path(directory)
    if (directory / INDEX_NAME).is_file():
        return [*_shard_files(directory / INDEX_NAME), INDEX_NAME]
    return [WEIGHTS_NAME]


def copy_portable(source: str | Path, directory: str | Path) -> Path:
    """Copy the portable checkpoint inside ``source`` (its config.json and weight files, e.g. of
    a training state) into ``directory``, file by file and atomically, replacing only another
    portable checkpoint."""
    source = Path(source)
    with atomic_directory(directory, what="portable checkpoint",
                          is_same_kind=is_weights_checkpoint) as tmp:
        for name in [CONFIG_NAME, *weight_files(source)]:
            shutil.copyfile(source / name, tmp / name)
    return Path(directory)


def temporary_directory(directory: str | Path) -> Path:
    """A new empty temporary sibling of ``directory`` (a name ``remove_stale_temporaries``
    clears), for a writer that fills it over time and then calls ``publish_directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(directory, "tmp")
    tmp.mkdir()
    return tmp


def publish_directory(tmp: Path, directory: Path) -> None:
    """Flush the complete temporary ``tmp`` and swap it in as ``directory`` (see
    ``atomic_directory``, whose last step this is)."""
    _finish_tree(tmp)
    _replace_dir(tmp, directory)


def _split_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Names (sorted) grouped into shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards, current, size = [], [], 0
    for k in sorted(sizes):
        if current and size + sizes[k] > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(k)
        size += sizes[k]
    shards.append(current)
    return shards


def _finish_tree(root: Path):
    """Give every file and directory under ``root`` the permissions of a plain mkdir/open under
    the umask (those of ``root``, made by mkdir; safetensors creates its files 0600), and flush
    them to disk so the swap never exposes a half-written file."""
    dir_mode = root.stat().st_mode & 0o7777
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            os.chmod(path, dir_mode & 0o666)
            _fsync(path)
        for name in dirnames:
            os.chmod(Path(dirpath) / name, dir_mode)
        _fsync(Path(dirpath))


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, directory: Path):
    """Swap ``tmp`` into place; the old directory is removed only after the new one is there."""
    if os.path.lexists(directory):
        old = _sibling(directory, "old")
        os.replace(directory, old)
        os.replace(tmp, directory)
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    _fsync(directory.parent)


def load_portable(directory: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a portable checkpoint: its config and float32 (or bfloat16) numpy tensors, checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}: not a portable SWA-MLA checkpoint")
    try:
        cfg = ModelConfig.load_saved(directory / CONFIG_NAME)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    tensors = read_weights(directory)
    check_tensors(tensors, cfg, str(directory))
    return cfg, tensors


def read_weights(directory: Path) -> dict[str, np.ndarray]:
    """The tensors of ``model.safetensors``, or of the shards its index lists (unchecked
    against a config: the caller does that)."""
    if (directory / INDEX_NAME).is_file():
        files = _shard_files(directory / INDEX_NAME)
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {INDEX_NAME} but does not exist")
        shard = read_safetensors(path, REWRITE_HINT)
        dup = set(shard) & set(tensors)
        if dup:
            raise CheckpointError(f"tensors {_abbrev(sorted(dup))} appear in more than one shard")
        tensors.update(shard)
    return tensors


REWRITE_HINT = ("write it again from its source (re-export or re-convert); a trainer's checkpoint "
                "cannot be repaired: resume from an earlier one")


def open_safetensors(paths: Sequence[Path], hint: str
                     ) -> tuple[dict[str, tuple[int, ...]], Callable[[str], np.ndarray]]:
    """(every tensor's shape, ``read(name)`` -> that tensor as float32) of safetensors files,
    opened without reading any tensor: a reader that holds one tensor at a time (a rank of a
    sharded run resuming from a portable state). Checked as :func:`read_safetensors` checks."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    owner: dict[str, Path] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    if part.get_dtype() not in ("F32", "BF16"):
                        raise CheckpointError(
                            f"{path}: tensors must be float32 or bfloat16 (SPEC section 7), got "
                            f"{name} ({part.get_dtype()}). Was it written by another tool? {hint}")
                    if name in owner:
                        raise CheckpointError(f"tensor {name} appears in more than one shard")
                    shapes[name], owner[name] = tuple(part.get_shape()), path
        except SafetensorError as e:
            raise CheckpointError(f"{path} is truncated or corrupt ({e}): {hint}") from e

    def read(name: str) -> np.ndarray:
        try:
            with safe_open(str(owner[name]), framework="numpy") as f:
                return np.asarray(f.get_tensor(name), dtype=np.float32)
        except SafetensorError as e:
            raise CheckpointError(f"{owner[name]} is truncated or corrupt ({e}): {hint}") from e

    return shapes, read


def weight_shards(directory: Path) -> list[Path]:
    """The safetensors files of a portable checkpoint: ``model.safetensors`` or its shards."""
    if (directory / INDEX_NAME).is_file():
        files = [directory / name for name in _shard_files(directory / INDEX_NAME)]
    elif (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise CheckpointError(f"{missing[0]} is listed in {INDEX_NAME} but does not exist")
    return files


def shape_views(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Zero-stride float32 arrays of these shapes (no memory): what shape checks take."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def read_safetensors(path: Path, hint: str) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file, which must all be float32 or bfloat16 (SPEC section
    7). A truncated or corrupt file is a CheckpointError naming it, with ``hint`` (the fix)."""
    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e}): {hint}") from e
    bad = [f"{k} ({v.dtype})" for k, v in sorted(tensors.items())
           if v.dtype not in (np.float32, ml_dtypes.bfloat16)]
    if bad:
        raise CheckpointError(f"{path}: tensors must be float32 or bfloat16 (SPEC section 7), got "
                              f"{_abbrev(bad)}. Was it written by another tool? {hint}")
    return tensors


def _shard_files(index_path: Path) -> list[str]:
    """The shard file names of a sharded checkpoint's index, checked."""
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path} is not valid JSON ({e}): {REWRITE_HINT}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) and Path(v).name == v for v in weight_map.values()):
        raise CheckpointError(f"{index_path} has no valid weight_map (an object of tensor name -> "
                              f"shard file name in the same directory): {REWRITE_HINT}")
    return sorted(set(weight_map.values()))


def is_portable_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (
        (path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file())


def is_weights_checkpoint(path: str | Path) -> bool:
    """A portable checkpoint that is not also a training state (trainer_state.json, see
    swamla.train_state), whose optimizer state a save of weights alone would drop."""
    return is_portable_checkpoint(path) and not (Path(path) / "trainer_state.json").exists()


# ------------------------------------------------------------------------------- other formats
TORCH_SUFFIXES = (".pt", ".pth")


def detect_format(path: Path) -> str:
    """Which checkpoint ``path`` is: portable, jax (native), torch (native ``.pt``), hf (a
    Hugging Face export, ``swamla.hf_files``), torch-run or jax-run (a trainer's output_dir);
    raises CheckpointError naming the accepted kinds."""
    from swamla.hf_files import hf_model_type  # it reads tensors through this module

    path = Path(path)
    if path.is_file() and path.suffix in TORCH_SUFFIXES:
        return "torch"
    if hf_model_type(path) is not None:  # its model_type is checked when it is read
        return "hf"
    if is_portable_checkpoint(path):  # PyTorch training checkpoints are portable directories too
        return "portable"
    if is_jax_checkpoint(path):
        return "jax"
    if path.is_dir() and (path / "train_config.json").is_file() and (path / "checkpoints").is_dir():
        return "torch-run" if torch_run_steps(path) else "jax-run"
    raise CheckpointError(
        f"{path} is not an SWA-MLA checkpoint: expected a portable directory (config.json + "
        "model.safetensors), a JAX directory (config.json + params/), a PyTorch .pt file, a "
        "Hugging Face export (swamla-convert --to hf), or a trainer's output_dir (its newest "
        "checkpoint is read)")


# The file a complete sharded PyTorch checkpoint holds, written last (swamla_torch.checkpoint).
TORCH_SHARDED_MARKER = "checkpoint.json"


def is_sharded_torch_checkpoint(path: str | Path) -> bool:
    """A complete sharded (torch.distributed.checkpoint) PyTorch training checkpoint."""
    return (Path(path) / TORCH_SHARDED_MARKER).is_file()


def torch_run_steps(run_dir: Path) -> list[Path]:
    """A PyTorch run's checkpoints ``step_N`` (sharded, or portable training states), oldest
    first."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").iterdir()
                  if p.name.startswith("step_")
                  and (is_portable_checkpoint(p) or is_sharded_torch_checkpoint(p)))


def is_jax_checkpoint(path: str | Path) -> bool:
    """A native JAX checkpoint (``swamla_jax.save_native``): config.json + params/."""
    path = Path(path)
    return path.is_dir() and (path / "params").is_dir() and (path / CONFIG_NAME).is_file()


def is_torch_checkpoint(path: str | Path) -> bool:
    """A native PyTorch checkpoint (``swamla_torch.save_native``): a ``torch.save`` zip whose
    pickled dict holds ``config`` and ``model``. Read without torch: only the pickle's keys."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            pickled = [n for n in z.namelist() if n.endswith("/data.pkl")]
            blob = _KeysOnly(io.BytesIO(z.read(pickled[0]))).load() if pickled else None
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, AttributeError,
            IndexError, TypeError):  # a zip, but not a torch.save of a dict
        return False
    return isinstance(blob, dict) and {"config", "model"} <= set(blob)


class _KeysOnly(pickle.Unpickler):
    """Unpickles a torch.save'd dict's structure: tensors and other objects become None."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return lambda *args, **kwargs: None

    def persistent_load(self, pid):
        return None
