"""How SWA-MLA is laid out on a device mesh: the one place that maps logical axes to mesh axes.

The model names the axes of every parameter (``embed``, ``q_heads``, ``mlp``...) and of the
residual stream (``act_batch``, ``act_seq``, ``act_embed``); ``LOGICAL_RULES`` maps them onto
the mesh axes ``data`` (replicas), ``fsdp`` (parameters, gradients and optimizer state sharded,
batch split) and ``tensor`` (heads and MLP width split), as MaxText does in one rules table.
"""

from __future__ import annotations

import logging
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES = (
    ("act_batch", BATCH_AXES),
    ("act_seq", None),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("q_lora", None),
    ("kv_lora", None),
    ("norm", None),
    ("layers", None),
)


def make_mesh(shape: tuple[int, int, int], devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (all devices by default)."""
    devices = jax.devices() if devices is None else devices
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, "
                         f"{len(devices)} available")
    # Auto axes: XLA propagates shardings from the parameters and our constraints (with Explicit
    # axes, newer JAX's default, every constraint becomes an assertion).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def axes_size(mesh, axes) -> int:
    """How many devices one entry of a PartitionSpec (None, an axis name or a tuple of names)
    splits a dimension over."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in names])) if names else 1


def _fit_spec(spec: PartitionSpec, shape, mesh: Mesh, name: str) -> PartitionSpec:
    """Drop mesh axes that do not divide a dimension (e.g. 50304 over 7 devices): replicate it."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = axes_size(mesh, axes)
        if size > 1 and dim % size:
            log.warning("%s: dimension %d is not divisible by mesh axes %s (%d); replicated",
                        name, dim, axes, size)
            out.append(None)
        else:
            out.append(axes)
    return PartitionSpec(*out)


def unbox_values(boxed):
    """Strip logical-axis boxes without applying their sharding constraints (for shapes)."""
    return jax.tree_util.tree_map(lambda x: x.unbox(apply_constraint=False), boxed,
                                  is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(boxed_abstract, mesh: Mesh):
    """NamedShardings for a (boxed) parameter tree from its logical axis names."""
    logical = nn.get_partition_spec(boxed_abstract)
    mesh_specs = nn.logical_to_mesh(logical, LOGICAL_RULES)
    shapes = unbox_values(boxed_abstract)
    paths = jax.tree_util.tree_leaves_with_path(shapes)
    specs = jax.tree_util.tree_leaves(mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    fitted = [NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh, jax.tree_util.keystr(path)))
              for (path, leaf), spec in zip(paths, specs)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), fitted)


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Token batches (..., B, T): B split over data x fsdp, ``leading`` unsharded axes first."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """Start multi-host JAX when asked by flags or by a recognised cluster environment.

    Flags win; otherwise ``jax.distributed.initialize()`` is called with no arguments when SLURM,
    Open MPI or JAX's own variables say there is more than one process (JAX reads them itself).
    """
    if coordinator_address is not None or num_processes is not None:
        if None in (coordinator_address, num_processes, process_id):
            raise ValueError("multi-host JAX needs coordinator_address, num_processes and "
                             "process_id together (or none of them, to auto-detect)")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    env = os.environ
    many = (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "JAX_COORDINATOR_ADDRESS" in env)
    if many:
        jax.distributed.initialize()
