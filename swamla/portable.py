"""The portable checkpoint format (SPEC.md section 7): names, shapes, and safetensors I/O.

Tensors are numpy arrays in the PyTorch ``[out, in]`` layout under the PyTorch parameter names.
Each backend converts its own parameters to and from this dict; this module checks the key set and
every shape against the config, and writes the directory atomically (a kill mid-save leaves the
previous checkpoint untouched).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from swamla.config import BlockKind, ConfigError, ModelConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold a valid SWA-MLA model for its config."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of SPEC section 7 for ``cfg``, with its shape."""
    C, h = cfg.n_embd, cfg.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (cfg.vocab_size, C)}

    def linear(name, n_out, n_in):
        shapes[f"{name}.weight"] = (n_out, n_in)
        if cfg.bias:
            shapes[f"{name}.bias"] = (n_out,)

    def block_norm(name):
        if cfg.use_dyt:
            shapes.update({f"{name}.alpha": (), f"{name}.weight": (C,), f"{name}.bias": (C,)})
        else:
            shapes[f"{name}.weight"] = (C,)

    def latent_norm(name, n):
        shapes[f"{name}.weight"] = (n,)
        if cfg.mla_norm == "layernorm":
            shapes[f"{name}.bias"] = (n,)

    H, dqk, dn, dv = cfg.n_head, cfg.mla_qk_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    r, dr, kv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_head_kv * cfg.head_dim
    for i, kind in enumerate(cfg.block_kinds):
        p = f"transformer.h.{i}"
        if kind is BlockKind.SWA:
            block_norm(f"{p}.norm1")
            block_norm(f"{p}.norm2")
            linear(f"{p}.attn.q_proj", C, C)
            linear(f"{p}.attn.k_proj", kv, C)
            linear(f"{p}.attn.v_proj", kv, C)
            linear(f"{p}.attn.o_proj", C, C)
            mlp = f"{p}.mlp"
        else:
            block_norm(f"{p}.attn_norm")
            block_norm(f"{p}.ffn_norm")
            if cfg.q_lora_rank:
                linear(f"{p}.attn.wq_a", cfg.q_lora_rank, C)
                latent_norm(f"{p}.attn.q_norm", cfg.q_lora_rank)
                linear(f"{p}.attn.wq_b", H * dqk, cfg.q_lora_rank)
            else:
                linear(f"{p}.attn.wq", H * dqk, C)
            linear(f"{p}.attn.wkv_a", r + dr, C)
            latent_norm(f"{p}.attn.kv_norm", r)
            linear(f"{p}.attn.wkv_b", H * (dn + dv), r)
            linear(f"{p}.attn.wo", C, H * dv)
            mlp = f"{p}.ffn"
        linear(f"{mlp}.gate_up_proj", 2 * h, C)
        linear(f"{mlp}.down_proj", C, h)
    block_norm("transformer.ln_f")
    return shapes


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


def save_portable(tensors: dict[str, np.ndarray], cfg: ModelConfig, directory: str | Path, *,
                  dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``config.json`` and the safetensors weights into ``directory`` atomically."""
    check_tensors(tensors, cfg, "the model being saved")
    with atomic_directory(directory) as tmp:
        write_portable(tensors, cfg, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return Path(directory)


@contextlib.contextmanager
def atomic_directory(directory: str | Path):
    """Yield a temporary sibling of ``directory`` that replaces it only once the block completes.

    A crash, kill or full disk inside the block leaves ``directory`` (the last good checkpoint)
    as it was; the temporary is removed on error.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_portable(tensors: dict[str, np.ndarray], cfg: ModelConfig, directory: Path, *,
                   dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """The files of a portable checkpoint into an existing (temporary) directory."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    # .copy(order="C") rather than np.ascontiguousarray, which turns a 0-d DyT alpha into 1-d.
    arrays = {k: np.asarray(v, dtype=np.float32).astype(_DTYPES[dtype]).copy(order="C")
              for k, v in tensors.items()}
    shards = _split_shards(arrays, max_shard_bytes)
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


def _split_shards(arrays, max_bytes):
    shards, current, size = [], {}, 0
    for k in sorted(arrays):
        nbytes = arrays[k].nbytes
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = arrays[k]
        size += nbytes
    shards.append(current)
    return shards


def _fsync_dir(path: Path):
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _replace_dir(tmp: Path, directory: Path):
    """Swap ``tmp`` into place; the old directory is removed only after the new one is there."""
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def load_portable(directory: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a portable checkpoint: its config and float32 (or bfloat16) numpy tensors, checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}: not a portable SWA-MLA checkpoint")
    try:
        cfg = ModelConfig.load(directory / CONFIG_NAME)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    if (directory / INDEX_NAME).is_file():
        index = json.loads((directory / INDEX_NAME).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {INDEX_NAME} but does not exist")
        shard = load_file(str(path))
        dup = set(shard) & set(tensors)
        if dup:
            raise CheckpointError(f"tensors {_abbrev(sorted(dup))} appear in more than one shard")
        tensors.update(shard)
    check_tensors(tensors, cfg, str(directory))
    return cfg, tensors


def is_portable_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (
        (path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file())
