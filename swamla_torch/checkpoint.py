"""Checkpoints of the PyTorch trainer.

A checkpoint is a portable training state (``swamla.train_state``: float32 weights and moments
under the portable names, step, data position, bad-step count) plus ``rng.pt``, the torch RNG
states of every rank. So any checkpoint resumes in either framework as it is, and a resume in
PyTorch is exact: float32 weights and moments round-trip bit for bit (bfloat16 moments too, as
bfloat16 -> float32 -> bfloat16 is exact), the schedule is a function of the step, and the data
loader restarts from its saved position. Checkpoints live in ``output_dir/checkpoints/step_N``,
each written atomically; the newest ``keep_checkpoints`` are kept.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swamla.config import ModelConfig
from swamla.portable import CheckpointError
from swamla.train_config import TrainConfig
from swamla.train_state import (is_train_state, load_train_state, moment_keys,
                                save_train_state)
from swamla_torch.distributed import DistEnv, all_gather_objects, barrier, full_numpy, like_param
from swamla_torch.model import SWAMLA

CHECKPOINT_DIR = "checkpoints"
RNG_NAME = "rng.pt"
_STEP_DIR = re.compile(r"step_(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``output_dir``, oldest first (temporary
    directories of an interrupted save start with '.' and are never listed)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    found = []
    for path in root.glob("step_*") if root.is_dir() else ():
        m = _STEP_DIR.match(path.name)
        if m and is_train_state(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


# ------------------------------------------------------------------ optimizer moments
def moment_arrays(optimizer: torch.optim.Optimizer, raw: SWAMLA, optimizer_type: str
                  ) -> dict[str, np.ndarray]:
    """Every parameter's moments as float32 host arrays (zeros before the first update). A
    collective under FSDP: every rank calls it."""
    out = {}
    for name, p in raw.named_parameters():
        state = optimizer.state.get(p, {})
        for key in moment_keys(optimizer_type):
            out[f"{name}.{key}"] = (full_numpy(state[key]) if key in state
                                    else np.zeros(tuple(p.shape), np.float32))
    return out


def set_moments(optimizer: torch.optim.Optimizer, raw: SWAMLA, moments: dict[str, np.ndarray],
                optimizer_type: str, step: int) -> None:
    """Install saved moments as the state after ``step`` updates (torch.optim.AdamW's layout:
    a float32 ``step`` tensor, on the device when fused, and the moment tensors)."""
    group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
    dtype = getattr(optimizer, "moment_dtype", torch.float32)
    for name, p in raw.named_parameters():
        group = group_of[p]
        on_device = group.get("fused") or group.get("capturable")
        state = {"step": torch.tensor(float(step), dtype=torch.float32,
                                      device=p.device if on_device else "cpu")}
        for key in moment_keys(optimizer_type):
            state[key] = like_param(moments[f"{name}.{key}"], p, dtype)
        optimizer.state[p] = state


# ------------------------------------------------------------------ save / load
def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(directory: str | Path, *, env: DistEnv, raw: SWAMLA,
                    optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int,
                    bad_steps: int, data_state: dict | None) -> Path:
    """Write a checkpoint (every rank calls this; rank 0 writes) and drop the oldest beyond
    ``cfg.keep_checkpoints``."""
    params = {k: full_numpy(v) for k, v in raw.state_dict().items()}
    moments = moment_arrays(optimizer, raw, cfg.optimizer_type)
    rngs = all_gather_objects(rng_state(env.device), env)
    directory = Path(directory)
    if env.is_main:
        buf = io.BytesIO()
        torch.save(rngs, buf)
        meta = {"step": step, "optimizer_type": cfg.optimizer_type,
                "train_config": cfg.to_dict(), "data_state": data_state,
                "bad_steps": bad_steps, "framework": "torch"}
        save_train_state(directory, raw.config, params, moments, meta,
                         extra_files={RNG_NAME: buf.getvalue()})
        if cfg.keep_checkpoints and directory.parent == Path(cfg.output_dir) / CHECKPOINT_DIR:
            for _, old in list_checkpoints(cfg.output_dir)[:-cfg.keep_checkpoints]:
                shutil.rmtree(old)
    barrier(env)
    return directory


@dataclasses.dataclass
class Resume:
    """What a run continues from: a checkpoint of this trainer or any portable training state."""

    path: Path
    model_config: ModelConfig
    params: dict[str, np.ndarray]
    moments: dict[str, np.ndarray]
    meta: dict[str, Any]
    rng: list | None  # per-rank torch RNG states; None for a state from another framework

    @property
    def step(self) -> int:
        return self.meta["step"]


def load_checkpoint(path: str | Path) -> Resume:
    path = Path(path)
    model_cfg, params, moments, meta = load_train_state(path)
    rng = None
    if (path / RNG_NAME).is_file():
        try:
            rng = torch.load(path / RNG_NAME, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # torch's "corrupt file"
            raise CheckpointError(f"{path / RNG_NAME} is truncated or corrupt ({e}): resume from "
                                  "an earlier checkpoint, or delete it to resume with fresh RNG "
                                  "states (dropout then differs from an uninterrupted run)") from e
    return Resume(path, model_cfg, params, moments, meta, rng)
