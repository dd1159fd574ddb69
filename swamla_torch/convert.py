"""PyTorch <-> portable checkpoint (SPEC.md section 7), and the native ``.pt`` checkpoint.

The PyTorch parameter names and ``[out, in]`` layout *are* the portable ones, so conversion is
the identity on names; this module only moves tensors between torch and numpy exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from swamla.config import ModelConfig, resolve_config
from swamla.plan import ComputePlan, REFERENCE_PLAN
from swamla.portable import (CheckpointError, apply_overrides, atomic_file, check_tensors,
                             is_torch_checkpoint, load_portable, save_portable)
from swamla_torch.model import SWAMLA


def from_config(config, *, seed: int = 0, plan: ComputePlan = REFERENCE_PLAN,
                **overrides) -> SWAMLA:
    """A randomly initialized model (SPEC 6) from a config, preset name, file or dict, run as
    ``plan`` says; the same seed gives the same weights under any plan."""
    cfg = resolve_config(config, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SWAMLA(cfg, plan)


def to_portable_tensors(model: SWAMLA) -> dict[str, np.ndarray]:
    """Model parameters as float32 numpy arrays under their portable names."""
    return {k: v.detach().to(torch.float32).cpu().numpy()
            for k, v in model.state_dict().items()}


def load_portable_tensors(model: SWAMLA, tensors: dict[str, np.ndarray], source: str) -> SWAMLA:
    check_tensors(tensors, model.config, source)
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in tensors.items()}
    model.load_state_dict(state, strict=True)
    return model


def save_pretrained(model: SWAMLA, directory: str | Path, *, dtype: str = "float32",
                    max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as a portable checkpoint directory (config.json + safetensors)."""
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    return save_portable(to_portable_tensors(model), model.config, directory, dtype=dtype, **kwargs)


def load_pretrained(directory: str | Path, *, plan: ComputePlan = REFERENCE_PLAN,
                    **config_overrides) -> SWAMLA:
    """A model from a portable checkpoint directory (float32 parameters), run as ``plan`` says.

    ``config_overrides`` may change only fields that do not affect weights (dropout, block_size...);
    the loaded tensors are checked against the resulting config.
    """
    cfg, tensors = load_portable(directory)
    cfg = apply_overrides(cfg, config_overrides, str(directory))
    with torch.device("meta"):
        model = SWAMLA(cfg, plan)
    model = model.to_empty(device="cpu")
    return load_portable_tensors(model, tensors, str(directory))


def save_native(model: SWAMLA, path: str | Path) -> Path:
    """The native PyTorch checkpoint: one ``.pt`` file with the config and the state dict."""
    # replaces only another such file, atomically
    with atomic_file(path, what="native PyTorch checkpoint",
                     is_same_kind=is_torch_checkpoint) as tmp:
        torch.save({"config": model.config.to_json_dict(), "model": model.state_dict()}, tmp)
    return Path(path)


def load_native(path: str | Path, *, plan: ComputePlan = REFERENCE_PLAN) -> SWAMLA:
    """A model from a native ``.pt`` checkpoint (``save_native``), run as ``plan`` says."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"PyTorch checkpoint {path} does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "config" not in blob or "model" not in blob:
        raise CheckpointError(f"{path} is not an SWA-MLA PyTorch checkpoint "
                              "(expected a dict with 'config' and 'model')")
    cfg = ModelConfig.from_dict(blob["config"], source=str(path))
    tensors = {k: v.to(torch.float32).numpy() for k, v in blob["model"].items()}
    with torch.device("meta"):
        model = SWAMLA(cfg, plan)
    return load_portable_tensors(model.to_empty(device="cpu"), tensors, str(path))
