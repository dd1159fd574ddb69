"""Linear projections as the plan runs them: FP8 GEMMs (``plan.fp8``) or XLA's, and the
projections that share an input fused into one GEMM (``plan.fuse_projections``).

Shapes: I input features, O output features (one or more axes): x (..., I), kernel w (I, O...).
Kernels are stored ``[I, O]`` (the transpose of PyTorch's) and name their logical axes; the
trainer's sharding rules map those to the mesh.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from swamla.config import ModelConfig
from swamla.plan import ComputePlan
from swamla_jax.kernels.fp8 import fp8_dot_general

f32 = jnp.float32


def _dot(plan: ComputePlan):
    return fp8_dot_general if plan.fp8 else lax.dot_general


def linear(x, kernel, bias, plan: ComputePlan):
    """``x w (+ b)`` in the plan's compute dtype, for w (I, O...) and b of w's output shape."""
    dtype = jnp.dtype(plan.compute_dtype)
    y = _dot(plan)(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
        y = y + bias.reshape(kernel.shape[1:]).astype(dtype)
    return y


def linear_params(module: nn.Module, in_features: int):
    """(kernel (I, features), bias or None) of a linear-shaped module (fields ``cfg``,
    ``features``, ``axes``): normal init with ``cfg.init_std``, a zero bias where ``cfg.bias``
    (SPEC 6)."""
    cfg, features, axes = module.cfg, module.features, module.axes
    kernel = module.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.init_std), axes), (in_features, features), f32)
    bias = (module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
                         (features,), f32)
            if cfg.bias else None)
    return kernel, bias


class LinearParams(nn.Module):
    """The parameters of a ``swamla_jax.layers.Linear`` (same names, same init), returned
    instead of applied: for :func:`fused_projections`, and for MLA's absorbed form, which
    splits its ``wkv_b`` kernel."""

    cfg: ModelConfig
    features: int
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, in_features: int):
        return linear_params(self, in_features)


def fused_projections(x, params, plan: ComputePlan):
    """``[x w_i + b_i for (w_i, b_i) in params]`` as one GEMM over the concatenated kernels.

    One GEMM instead of several reads x once, runs wider (narrow projections, such as grouped
    k/v heads, underfill a GPU), and in the backward pass yields d(x) from one GEMM rather than a
    sum of several; with FP8, x is quantized once for all of them. The kernels stay separate
    parameters (the checkpoint layout does not change); their concatenation is a copy of the
    weights, small next to the activations. Needs the kernels' output axes unsharded (no tensor
    parallelism): concatenating sharded columns would interleave the shards.
    """
    dtype = jnp.dtype(plan.compute_dtype)
    kernel = jnp.concatenate([w.astype(dtype) for w, _ in params], axis=1)
    y = _dot(plan)(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if not plan.fp8:  # FP8's backward reads the cotangent for its amax and cast, not as a GEMM's
        y = _cotangent_written_once(y)
    if params[0][1] is not None:  # the projections of a block all have biases or none (cfg.bias)
        y = y + jnp.concatenate([b.astype(dtype) for _, b in params])
    splits = list(np.cumsum([w.shape[1] for w, _ in params])[:-1])
    return jnp.split(y, splits, axis=-1)


@jax.custom_vjp
def _cotangent_written_once(y):
    """The identity, whose cotangent is materialized once for the GEMMs that read it.

    The cotangent of a fused projection is the concatenation of its parts' gradients (dq, dk, dv).
    Both the dx and the dW GEMM read it, and XLA fuses the concatenation into each of them
    separately, writing the same tensor twice (~2.2 ms a step on base, H100); the barrier makes
    it one tensor with two readers."""
    return y


_cotangent_written_once.defvjp(lambda y: (y, None), lambda _, g: (lax.optimization_barrier(g),))
