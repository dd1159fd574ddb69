"""SwiGLU's backward pass as one Pallas (Triton) kernel on GPU (``plan.mlp_impl == "pallas"``;
SPEC.md section 4).

Shapes: B batch, T time, M rows (B x T flattened), F MLP hidden width; the fused projection is
(M, 2, F) = (up, gate).

The backward reads the fused projection and the output's gradient and writes the gradient of
the fused projection: 10 bytes per hidden element in bf16, a pure streaming pass. Each program
takes a (rows, 2, columns) tile, reads both halves once and writes both gradients, so nothing but
the tile lives between the reads and the writes: ~3.1 TB/s inside base's step on an H200, where
XLA's form of the same pass runs at ~2.3 TB/s (7.9 ms a step against 10.4).

``swiglu_grad`` runs the kernel on each device's shard (``jax.shard_map`` over the mesh in
context, with the activations' logical axes), since XLA cannot partition a custom kernel itself;
the trainer sets that mesh (``jax.set_mesh``). Off GPU it runs in Pallas' interpreter, which the
CPU tests use. It uses Pallas' Triton backend, which JAX 0.11 marks deprecated in favour of
Mosaic GPU; ``--mlp_impl xla`` is the fallback.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from swamla_jax import sharding

f32 = jnp.float32

# Logical axes of the fused projection (B, T, 2, F): the model's residual-stream batch axis and
# the MLP width (swamla_jax.sharding.LOGICAL_RULES); its output's are the same less the 2.
_GU_AXES = ("act_batch", "act_seq", None, "mlp")
_ROWS = 8  # rows of a tile: with 1024 columns, 32 KiB of the fused input per program
_COLUMNS = (1024, 512, 256, 128)  # Triton tiles are powers of two: the widest that divides F


def swiglu_grads(up, gate, d):
    """(d up, d gate) of ``silu(gate) * up`` in float32; silu'(g) = s (1 + g (1 - s)) with
    s = sigmoid(g). The one formula of both backward forms, this kernel's and XLA's."""
    sig = jax.nn.sigmoid(gate)
    return d * gate * sig, d * up * sig * (1.0 + gate * (1.0 - sig))


def _kernel(gu_ref, d_ref, out_ref):
    up, gate = gu_ref[:, 0, :].astype(f32), gu_ref[:, 1, :].astype(f32)
    d_up, d_gate = swiglu_grads(up, gate, d_ref[...].astype(f32))
    out_ref[:, 0, :] = d_up.astype(out_ref.dtype)
    out_ref[:, 1, :] = d_gate.astype(out_ref.dtype)


def tiles(rows: int, width: int) -> tuple[int, int] | None:
    """The (rows, columns) tile for an (rows, 2, width) shard, or None when none divides it."""
    if rows % _ROWS:
        return None
    cols = next((c for c in _COLUMNS if width % c == 0), None)
    return None if cols is None else (_ROWS, cols)


def _local_grad(gu, d_out):
    *lead, _, F = gu.shape
    M = math.prod(lead)
    bm, bf = tiles(M, F)
    out = pl.pallas_call(
        _kernel,
        out_shape=jax.ShapeDtypeStruct((M, 2, F), gu.dtype),
        grid=(M // bm, F // bf),
        in_specs=[pl.BlockSpec((bm, 2, bf), lambda i, j: (i, 0, j)),
                  pl.BlockSpec((bm, bf), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((bm, 2, bf), lambda i, j: (i, 0, j)),
        interpret=jax.default_backend() != "gpu",
        name="swiglu_bwd",
    )(gu.reshape(M, 2, F), d_out.reshape(M, F))
    return out.reshape(gu.shape)


class _Unsupported(Exception):
    """The kernel cannot take this shape or sharding; the caller keeps XLA's form."""


def _plan(shape):
    """(mesh, fused spec, output spec) for the mesh in context, None on one device; raises
    _Unsupported when a shard's rows or width do not divide into tiles."""
    mesh, specs, local = jax.sharding.get_abstract_mesh(), None, list(shape)
    if not mesh.empty and mesh.size > 1:
        gu_spec = nn.logical_to_mesh_axes(_GU_AXES)  # the trainer's rules are in context
        for i, axes in enumerate(gu_spec):
            size = sharding.axes_size(mesh, axes)
            if local[i] % size:
                raise _Unsupported
            local[i] //= size
        specs = mesh, gu_spec, PartitionSpec(gu_spec[0], gu_spec[1], gu_spec[3])
    if tiles(math.prod(local[:-2]), local[-1]) is None:
        raise _Unsupported
    return specs


def supported(gu_shape) -> bool:
    """Whether the kernel takes a fused projection of this (B, T, 2, F) shape on the mesh in
    context (each shard's rows and width must divide into tiles)."""
    try:
        _plan(gu_shape)
    except _Unsupported:
        return False
    return True


def swiglu_grad(gu, d_out):
    """The gradient of ``silu(gate) * up`` with respect to the fused ``gu`` (B, T, 2, F) =
    (up, gate), given ``d_out`` (B, T, F), in gu's dtype. Call only where ``supported``."""
    specs = _plan(gu.shape)
    if specs is None:
        return _local_grad(gu, d_out)
    mesh, gu_spec, out_spec = specs
    return jax.shard_map(_local_grad, mesh=mesh, in_specs=(gu_spec, out_spec), out_specs=gu_spec,
                         check_vma=False)(gu, d_out)
