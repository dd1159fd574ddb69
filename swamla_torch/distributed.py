"""Where the PyTorch trainer runs: the device, the process group and how the model is wrapped.

The one place that chooses a device (CUDA if present, else CPU), a backend (NCCL on GPU, gloo on
CPU) and a wrapping: DDP by default, FSDP2 (``fully_shard`` per block, then the root) with
``fsdp``, then ``torch.compile`` with ``compile``. ``torchrun`` sets RANK / WORLD_SIZE /
LOCAL_RANK; without them the run is a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from swamla.train_config import TrainConfig
from swamla_torch.model import SWAMLA


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # whether setup() created the process group (and teardown() ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


def setup() -> DistEnv:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device,
                   owns_group=owns)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@dataclasses.dataclass
class Parallel:
    """The model as trained: ``model`` to call, ``raw`` the SWAMLA whose names checkpoints use."""

    model: Any
    raw: SWAMLA
    ddp: DistributedDataParallel | None
    fsdp: bool

    def grad_sync(self, enabled: bool):
        """Context of one micro-batch's forward and backward: gradients are all-reduced only
        when ``enabled`` (the last micro-batch of an accumulation)."""
        if self.ddp is not None and not enabled:
            return self.ddp.no_sync()
        if self.fsdp:
            self.raw.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()


def parallelize(raw: SWAMLA, cfg: TrainConfig, env: DistEnv) -> Parallel:
    """Wrap a model already on ``env.device``: FSDP2 or DDP over the ranks, then compile."""
    ddp = None
    fsdp = cfg.fsdp and env.world_size > 1
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in raw.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(raw, mesh=mesh)
        model = raw
    elif env.world_size > 1:
        ddp = DistributedDataParallel(
            raw, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
        model = ddp
    else:
        model = raw
    if cfg.compile:
        model = torch.compile(model)
    return Parallel(model=model, raw=raw, ddp=ddp, fsdp=fsdp)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world_size > 1:
        dist.all_reduce(t)
    return t


def all_gather_objects(obj, env: DistEnv) -> list:
    """``obj`` of every rank, in rank order (a one-element list on a single process)."""
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def checkpoint_group(env: DistEnv):
    """A gloo process group of all ranks for checkpoint I/O (None on a single process): an
    asynchronous save's collectives run in a background thread, so they get a group of their
    own instead of interleaving with the training's, and a CPU one even when training uses
    NCCL. A collective: every rank creates it, in the same order."""
    return dist.new_group(backend="gloo") if env.world_size > 1 else None


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def full_numpy(t: torch.Tensor) -> np.ndarray:
    """The whole tensor as float32 numpy on the host; a collective for FSDP DTensors (every
    rank must call it in the same order)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to(torch.float32).cpu().numpy()


def like_param(full: np.ndarray, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A host array laid out like parameter ``p`` (sharded as ``p`` under FSDP), in ``dtype``."""
    t = torch.from_numpy(np.ascontiguousarray(full, dtype=np.float32)).to(dtype)
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
    return t.to(p.device)
