"""Flax parameters <-> portable checkpoint (SPEC.md section 7), and the public model handle.

Conversion is a name table plus transposes: a Flax path ``a/b/kernel`` is the portable
``a.b.weight`` transposed, ``embedding``/``weight``/``bias``/``alpha`` keep their layout, and layer
``i`` lives where ``swamla.layout.layer_location`` says: ``cycles/block_{i % L}`` (row ``i // L``
of the stacked scan parameters) or, for the unrolled remainder, ``h_{i}``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from swamla.config import ModelConfig, check_target_ids, check_token_ids, resolve_config
from swamla.plan import ComputePlan, REFERENCE_PLAN
from swamla.portable import (CheckpointError, apply_overrides, atomic_directory, check_tensors,
                             is_jax_checkpoint, load_portable, save_portable)
from swamla_jax.model import SWAMLA

_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "weight": "weight", "bias": "bias",
               "alpha": "alpha"}


def to_portable_tensors(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """Flax params (boxed or not) -> float32 numpy tensors under the portable names."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        value = np.asarray(jax.device_get(value), dtype=np.float32)
        parts = path.split("/")
        leaf = parts[-1]
        if parts[0] == "cycles":
            j = int(parts[1].removeprefix("block_"))
            inner = parts[2:-1]
            for c in range(value.shape[0]):
                i = c * len(cfg.cycle) + j
                out[_portable_name(i, inner, leaf)] = _to_torch_layout(value[c], leaf)
        elif parts[0].startswith("h_"):
            out[_portable_name(int(parts[0][2:]), parts[1:-1], leaf)] = _to_torch_layout(value, leaf)
        else:  # wte, ln_f
            out[f"transformer.{'.'.join(parts[:-1])}.{_LEAF_NAMES[leaf]}"] = value
    return out


def _portable_name(i: int, inner: list[str], leaf: str) -> str:
    return f"transformer.h.{i}.{'.'.join(inner)}.{_LEAF_NAMES[leaf]}"


def _to_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    return value.T.copy(order="C") if leaf == "kernel" else value


def from_portable_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], template) -> Any:
    """Portable tensors -> Flax params shaped like ``template`` (e.g. from ``abstract_params``)."""
    check_tensors(tensors, cfg, "the portable tensors")
    flat = traverse_util.flatten_dict(nn.meta.unbox(template), sep="/")
    out = {}
    for path, like in flat.items():
        parts = path.split("/")
        leaf = parts[-1]
        if parts[0] == "cycles":
            j = int(parts[1].removeprefix("block_"))
            rows = [_from_torch_layout(tensors[_portable_name(c * len(cfg.cycle) + j, parts[2:-1],
                                                              leaf)], leaf)
                    for c in range(like.shape[0])]
            value = np.stack(rows)
        elif parts[0].startswith("h_"):
            value = _from_torch_layout(tensors[_portable_name(int(parts[0][2:]), parts[1:-1], leaf)],
                                       leaf)
        else:
            value = tensors[f"transformer.{'.'.join(parts[:-1])}.{_LEAF_NAMES[leaf]}"]
        value = np.asarray(value, dtype=np.float32)
        if value.shape != tuple(like.shape):
            raise CheckpointError(f"tensor for {path} has shape {value.shape}, expected {like.shape}")
        out[path] = jnp.asarray(value)
    return traverse_util.unflatten_dict(out, sep="/")


def _from_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    return np.asarray(value).T if leaf == "kernel" else np.asarray(value)


@dataclasses.dataclass
class Model:
    """A Flax SWA-MLA module together with its (unboxed, float32) parameters."""

    module: SWAMLA
    params: Any

    @property
    def config(self) -> ModelConfig:
        return self.module.cfg

    def __call__(self, idx, targets=None, *, train: bool = False, rng=None):
        """(logits, loss) for token ids (B, T); ``train=True`` applies dropout with ``rng``."""
        check_token_ids(idx, self.config.vocab_size)
        if targets is not None:
            check_target_ids(targets, self.config.vocab_size)
        if train and self.config.dropout > 0.0 and rng is None:
            raise ValueError("train=True with dropout > 0 needs rng=jax.random.key(...)")
        return self._apply(self.params, jnp.asarray(idx),
                           None if targets is None else jnp.asarray(targets),
                           {} if rng is None else {"dropout": rng}, not train)

    @functools.cached_property
    def _apply(self):
        def apply(params, idx, targets, rngs, deterministic):
            return self.module.apply({"params": params}, idx, targets,
                                     deterministic=deterministic, rngs=rngs)
        return jax.jit(apply, static_argnums=4)

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))


def init_params(module: SWAMLA, seed: int = 0):
    """SPEC 6 random init; returns boxed params (they carry their logical axis names)."""
    idx = jnp.zeros((1, 1), jnp.int32)
    return module.init(jax.random.key(seed), idx)["params"]


def abstract_params(module: SWAMLA):
    """Shapes/dtypes of the (unboxed) params without computing them."""
    return nn.meta.unbox(jax.eval_shape(lambda: init_params(module)))


def from_config(config, *, seed: int = 0, plan: ComputePlan = REFERENCE_PLAN,
                **overrides) -> Model:
    """A randomly initialized model (SPEC 6) from a config, preset name, file or dict, run as
    ``plan`` says; the same seed gives the same weights under any plan."""
    module = SWAMLA(resolve_config(config, **overrides), plan)
    return Model(module, nn.meta.unbox(init_params(module, seed)))


def save_pretrained(model: Model, directory: str | Path, *, dtype: str = "float32",
                    max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as a portable checkpoint directory (config.json + safetensors)."""
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    return save_portable(to_portable_tensors(model.config, model.params), model.config, directory,
                         dtype=dtype, **kwargs)


def load_pretrained(directory: str | Path, *, plan: ComputePlan = REFERENCE_PLAN,
                    **config_overrides) -> Model:
    """A model from a portable checkpoint directory (float32 params), run as ``plan`` says."""
    cfg, tensors = load_portable(directory)
    cfg = apply_overrides(cfg, config_overrides, str(directory))
    module = SWAMLA(cfg, plan)
    return Model(module, from_portable_tensors(cfg, tensors, abstract_params(module)))


NATIVE_PARAMS_DIR = "params"


def save_native(model: Model, directory: str | Path) -> Path:
    """The native JAX checkpoint: ``config.json`` plus an Orbax checkpoint of the params, written
    atomically; an existing ``directory`` is replaced only if empty or a native checkpoint."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    # replaces only another native JAX checkpoint
    with atomic_directory(directory, what="native JAX checkpoint",
                          is_same_kind=is_jax_checkpoint) as tmp:
        with ocp.StandardCheckpointer() as ckptr:  # leaving the block waits for the save
            ckptr.save(tmp / NATIVE_PARAMS_DIR, model.params)
        model.config.save(tmp / "config.json")
    return directory


def load_native(directory: str | Path, *, plan: ComputePlan = REFERENCE_PLAN) -> Model:
    """A model from a native JAX checkpoint (``save_native``), run as ``plan`` says."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not is_jax_checkpoint(directory):
        raise CheckpointError(f"{directory} is not a native SWA-MLA JAX checkpoint "
                              f"(expected config.json and {NATIVE_PARAMS_DIR}/)")
    module = SWAMLA(ModelConfig.load_saved(directory / "config.json"), plan)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / NATIVE_PARAMS_DIR, abstract_params(module))
    return Model(module, params)
