"""Checkpoints of the PyTorch trainer: sharded while training, portable at the end.

``output_dir/checkpoints/step_N`` holds one of two kinds, each complete or absent:

- **sharded**, every ``save_interval`` steps and on SIGTERM: torch.distributed.checkpoint (DCP)
  files, each rank writing its own shards from a background thread while training goes on::

      step_N/.metadata, __<rank>_0.distcp   # DCP: "model.<param>", "optim.<param>.<moment>"
      step_N/config.json                     # the model config
      step_N/rng.pt                          # every rank's torch RNG states
      step_N/checkpoint.json                 # the training-state fields; written last

  DCP reshards on load, so it resumes at any world size and wrapping (DDP, FSDP2, one process).
- **portable**, the step at ``max_iters`` (and every checkpoint of earlier versions): a portable
  training state (``swamla.train_state``) plus ``rng.pt``, which the JAX trainer resumes too. It
  is converted from that step's sharded save by rank 0, one tensor at a time, as
  ``python -m swamla.train_state export-torch`` converts any sharded checkpoint on demand.

No rank holds more than its own shards and one tensor during a save. A save writes into
``.step_N.tmp-XXXX`` and is renamed to ``step_N`` once complete; listing ignores anything else,
and a trainer's startup removes what a kill left. Resume is exact: float32 weights and the
moments in their own dtype round-trip bit for bit, the schedule is a function of the step, and
the data loader restarts from its saved position. The newest ``keep_checkpoints`` are kept.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from swamla.config import ModelConfig
from swamla.portable import (TORCH_SHARDED_MARKER, CheckpointError, CheckpointWriteError,
                             publish_directory,
                             temporary_directory)
from swamla.train_config import TrainConfig
from swamla.train_state import (check_meta, is_train_state, moment_keys, open_train_state,
                                write_train_state)
from swamla_torch.distributed import (DistEnv, all_gather_objects, checkpoint_group, like_param)
from swamla_torch.model import SWAMLA

CHECKPOINT_DIR = "checkpoints"
RNG_NAME = "rng.pt"
MARKER_NAME = TORCH_SHARDED_MARKER  # written last: the checkpoint is complete
SHARDED_FORMAT = "swamla-torch-sharded"
SHARDED_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step:08d}"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A complete sharded checkpoint (its checkpoint.json is written last)."""
    return (Path(path) / MARKER_NAME).is_file()


def is_checkpoint(path: str | Path) -> bool:
    """A checkpoint this trainer resumes: sharded, or a portable training state."""
    return is_sharded_checkpoint(path) or is_train_state(path)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``output_dir``, oldest first (temporary
    directories of an interrupted save start with '.' and are never listed)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    found = []
    for path in root.glob("step_*") if root.is_dir() else ():
        m = _STEP_DIR.match(path.name)
        if m and is_checkpoint(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


# ------------------------------------------------------------------ the tensors saved
def _key(name: str, params: Any) -> str:
    """The DCP key of a parameter or of a moment (``<param>.<moment>``)."""
    return f"model.{name}" if name in params else f"optim.{name}"


def init_moments(optimizer: torch.optim.Optimizer, raw: SWAMLA, optimizer_type: str,
                 updates: int) -> None:
    """Give every parameter without optimizer state zero moments after ``updates`` updates, in
    torch.optim.AdamW's layout (a float32 ``step`` tensor, on the device when fused, and the
    moments, laid out and sharded as the parameter): the state before the first update, and the
    tensors a resume loads into."""
    group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
    dtype = getattr(optimizer, "moment_dtype", torch.float32)
    for p in raw.parameters():
        if optimizer.state.get(p):
            continue
        on_device = group_of[p].get("fused") or group_of[p].get("capturable")
        state = {"step": torch.tensor(float(updates), dtype=torch.float32,
                                      device=p.device if on_device else "cpu")}
        for key in moment_keys(optimizer_type):
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        optimizer.state[p] = state


def _live_tensors(raw: SWAMLA, optimizer: torch.optim.Optimizer, optimizer_type: str
                  ) -> dict[str, torch.Tensor]:
    """The run's parameters and moments under their DCP keys: FSDP2 DTensors (each rank's
    shards) or plain tensors, sharing storage with the run."""
    out = {f"model.{k}": v.detach() for k, v in raw.state_dict().items()}
    for name, p in raw.named_parameters():
        for key in moment_keys(optimizer_type):
            out[f"optim.{name}.{key}"] = optimizer.state[p][key].detach()
    return out


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------ saving
@dataclasses.dataclass
class _Pending:
    step: int
    directory: Path
    tmp: Path
    future: Any  # DCP's concurrent.futures.Future
    files: dict[str, bytes]  # rank 0's small files, checkpoint.json last


class Saves:
    """The trainer's sharded saves, one in flight at a time. Every rank stages a copy of its own
    shards (``start``), then DCP writes them from a background thread over a gloo group of its
    own; rank 0 completes the checkpoint (its small files, then the rename) once every shard is
    on disk, seen by ``poll`` after each step or by ``wait``."""

    def __init__(self, env: DistEnv, cfg: TrainConfig):
        self.env, self.cfg = env, cfg
        self.group = checkpoint_group(env)
        # DCP warns at each call without a process group, as if one were missing by mistake.
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        self.pending: _Pending | None = None

    @property
    def pending_step(self) -> int | None:
        return self.pending.step if self.pending else None

    def start(self, directory: Path, step: int, tensors: dict[str, torch.Tensor],
              files: dict[str, bytes]) -> None:
        self.wait()
        name = str(temporary_directory(directory)) if self.env.is_main else None
        tmp = Path(all_gather_objects(name, self.env)[0])
        # async_save first copies this rank's shards to host memory (training then goes on
        # while the thread writes the copy): the only allocation the size of the shards.
        future = dcp.async_save(tensors, storage_writer=FileSystemWriter(tmp),
                                process_group=self.group, no_dist=self.env.world_size == 1)
        self.pending = _Pending(step, directory, tmp, future, files)

    def poll(self) -> Path | None:
        """Complete the pending save if its writes are done; its path then, else None. A failed
        write is reported by ``wait``, which every rank reaches at the same step."""
        p = self.pending
        if p is None or not p.future.done() or p.future.exception() is not None:
            return None
        return self._complete()

    def wait(self) -> Path | None:
        """Block until the pending save is complete; its path (None if there was none). Raises
        CheckpointWriteError, on every rank, if a rank could not write its shards (the partial
        save is removed and the checkpoints beside it stay as they were)."""
        p = self.pending
        if p is None:
            return None
        try:
            p.future.result()
        except CheckpointException as e:  # DCP's, with every failing rank's exception
            self.pending = None
            if self.env.is_main:
                shutil.rmtree(p.tmp, ignore_errors=True)
            causes = "; ".join(f"rank {rank}: {exc}" for rank, (exc, _) in e.failures.items())
            raise _write_error(p.directory, causes) from e
        return self._complete()

    def _complete(self) -> Path:
        p, self.pending = self.pending, None
        if self.env.is_main:
            try:
                for name, data in p.files.items():
                    (p.tmp / name).write_bytes(data)
                publish_directory(p.tmp, p.directory)
            except OSError as e:
                shutil.rmtree(p.tmp, ignore_errors=True)
                raise _write_error(p.directory, str(e)) from e
            self._drop_old(p.directory)
        return p.directory

    def _drop_old(self, written: Path) -> None:
        keep, out = self.cfg.keep_checkpoints, Path(self.cfg.output_dir)
        if keep and written.parent == out / CHECKPOINT_DIR:
            for _, old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old)


def _write_error(directory: Path, cause: str) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"could not write {directory}: {cause}. Nothing was replaced: the checkpoints beside it "
        "are intact, and the partial write was removed")


def save_checkpoint(directory: str | Path, *, env: DistEnv, raw: SWAMLA,
                    optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int,
                    bad_steps: int, data_state: dict | None, saves: Saves) -> Path:
    """Start the sharded save of the run at ``step`` into ``directory`` (every rank calls this);
    ``saves`` completes it in the background. Returns ``directory``."""
    init_moments(optimizer, raw, cfg.optimizer_type, step - bad_steps)  # all steps skipped
    rngs = all_gather_objects(rng_state(env.device), env)
    files = {}
    if env.is_main:
        buf = io.BytesIO()
        torch.save(rngs, buf)
        meta = check_meta({"step": step, "optimizer_type": cfg.optimizer_type,
                           "train_config": cfg.to_dict(), "data_state": data_state,
                           "bad_steps": bad_steps, "framework": "torch"}, str(directory))
        marker = {**meta, "format": SHARDED_FORMAT, "version": SHARDED_VERSION,
                  "world_size": env.world_size}
        config = json.dumps(raw.config.to_json_dict(), indent=2) + "\n"
        files = {"config.json": config.encode(),
                 RNG_NAME: buf.getvalue(),
                 MARKER_NAME: json.dumps(marker, indent=2, allow_nan=False).encode()}
    saves.start(Path(directory), step, _live_tensors(raw, optimizer, cfg.optimizer_type), files)
    return Path(directory)


# ------------------------------------------------------------------ reading
def _sharded_meta(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and training-state fields of a sharded checkpoint, checked."""
    try:
        marker = json.loads((path / MARKER_NAME).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / MARKER_NAME} is not valid JSON ({e}): resume from an "
                              "earlier checkpoint") from e
    if marker.get("format") != SHARDED_FORMAT or marker.get("version") != SHARDED_VERSION:
        raise CheckpointError(f"{path / MARKER_NAME}: format {marker.get('format')!r} version "
                              f"{marker.get('version')!r} is not a {SHARDED_FORMAT} v"
                              f"{SHARDED_VERSION} checkpoint this code reads")
    fields = {k: v for k, v in marker.items() if k not in ("format", "version", "world_size")}
    model = ModelConfig.load_saved(path / "config.json")
    return model, check_meta(fields, str(path / MARKER_NAME))


def sharded_reader(path: str | Path) -> tuple[dict[str, tuple[int, ...]], Callable]:
    """(every saved parameter's shape, ``read(name)``): one parameter or moment of a sharded
    checkpoint at a time, as a float32 numpy array, read by this process alone."""
    reader = FileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    params = {k[len("model."):] for k in saved if k.startswith("model.")}

    def read(name: str) -> np.ndarray:
        key = _key(name, params)
        meta = saved[key]
        out = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
        with warnings.catch_warnings():  # "no process group": this process reads alone
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=reader, no_dist=True)
        return out[key].float().numpy()

    return {k: tuple(saved[f"model.{k}"].size) for k in params}, read


def to_train_state(checkpoint: str | Path, out: str | Path, *, with_rng: bool) -> Path:
    """Write the portable training state of a sharded checkpoint at ``out`` (which may be the
    checkpoint itself: it is replaced once the state is complete), one tensor at a time."""
    checkpoint = Path(checkpoint)
    model, meta = _sharded_meta(checkpoint)
    shapes, read = sharded_reader(checkpoint)
    rng = (checkpoint / RNG_NAME).read_bytes() if with_rng else None
    return write_train_state(out, model, meta, read,
                             extra_files={RNG_NAME: rng} if rng is not None else None,
                             replaces=is_checkpoint)


@dataclasses.dataclass
class Resume:
    """What a run continues from: a checkpoint of this trainer or any portable training state.
    ``read``: one tensor of a portable state at a time, as float32; None for a sharded
    checkpoint, whose tensors each rank loads straight into its shards (``restore``)."""

    path: Path
    model_config: ModelConfig
    meta: dict[str, Any]
    rng: list | None  # per-rank torch RNG states; None for a state from another framework
    shapes: dict[str, Any]  # parameter name -> shape, for the checks before loading
    read: Callable[[str], np.ndarray] | None = None  # a portable state's tensor by name

    @property
    def step(self) -> int:
        return self.meta["step"]


def load_checkpoint(path: str | Path) -> Resume:
    path = Path(path)
    read = None
    if is_sharded_checkpoint(path):
        model_cfg, meta = _sharded_meta(path)
        shapes = {k: torch.empty(s, device="meta") for k, s in sharded_reader(path)[0].items()}
    else:  # tensor by tensor: no rank holds the whole state
        model_cfg, shapes, _, read, meta = open_train_state(path)
    rng = None
    if (path / RNG_NAME).is_file():
        try:
            rng = torch.load(path / RNG_NAME, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # torch's "corrupt file"
            raise CheckpointError(f"{path / RNG_NAME} is truncated or corrupt ({e}): resume from "
                                  "an earlier checkpoint, or delete it to resume with fresh RNG "
                                  "states (dropout then differs from an uninterrupted run)") from e
    return Resume(path, model_cfg, meta, rng, shapes, read)


@torch.no_grad()
def restore(resume: Resume, raw: SWAMLA, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
            saves: Saves) -> None:
    """Load a checkpoint's weights and moments into the wrapped run (every rank calls this)."""
    updates = resume.step - resume.meta["bad_steps"]
    init_moments(optimizer, raw, cfg.optimizer_type, updates)
    tensors = _live_tensors(raw, optimizer, cfg.optimizer_type)
    if resume.read is None:  # DCP reads each rank's shards of the saved layout
        dcp.load(tensors, checkpoint_id=resume.path, process_group=saves.group,
                 no_dist=saves.env.world_size == 1)
        return
    for key, t in tensors.items():  # one full tensor in host memory at a time
        t.copy_(like_param(resume.read(key.split(".", 1)[1]), t, t.dtype))
