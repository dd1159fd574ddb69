"""Linear, embedding, norms, RoPE and the SwiGLU MLP of SWA-MLA in Flax (SPEC.md 3 and 4).

Shapes: B batch, T time, C model width, H heads, D head dim, P = D/2 rotation pairs, F hidden.

Every parameter names its logical axes; how they map to mesh axes is decided by the trainer's
sharding rules, never here. Kernels are stored ``[in, out]`` (the transpose of PyTorch's).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from swamla.config import ModelConfig
from swamla.train_config import MLP_IMPLS

Dtype = Any
f32 = jnp.float32


def _param(module, name, init, axes, shape, dtype=f32):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Linear(nn.Module):
    """``y = x W (+ b)`` in the compute dtype; ``dot_general`` is the hook FP8 plugs into.

    With ``view`` the (in, features) kernel is multiplied as (in, *view) with logical axes
    ``view_axes``, and y comes out (..., *view): the stored layout stays, the sharding of the
    product follows the view (see SwiGLU).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Dtype = f32
    dot_general: Callable | None = None
    view: tuple[int, ...] | None = None
    view_axes: tuple[str | None, ...] | None = None

    @nn.compact
    def __call__(self, x):
        kernel, bias = _linear_params(self, x.shape[-1])
        out = (self.features,) if self.view is None else self.view
        if self.view is not None:
            kernel = nn.with_logical_constraint(kernel.reshape(x.shape[-1], *out), self.view_axes)
        dot = self.dot_general or lax.dot_general
        y = dot(x.astype(self.dtype), kernel.astype(self.dtype),
                (((x.ndim - 1,), (0,)), ((), ())))
        if bias is not None:
            y = y + bias.reshape(out).astype(self.dtype)
        return y


def _linear_params(module, in_features: int):
    """(kernel (in, features), bias or None) of a Linear-shaped module."""
    kernel = _param(module, "kernel", nn.initializers.normal(module.init_std), module.axes,
                    (in_features, module.features))
    bias = (_param(module, "bias", nn.initializers.zeros, (module.axes[1],), (module.features,))
            if module.use_bias else None)
    return kernel, bias


class LinearParams(nn.Module):
    """The parameters of a :class:`Linear` (same names, same init), returned instead of applied:
    for projections of one input that :func:`fused_projections` runs as a single GEMM."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    init_std: float = 0.02

    @nn.compact
    def __call__(self, in_features: int):
        return _linear_params(self, in_features)


def fused_projections(x, params, dtype, dot_general=None):
    """``[x W_i + b_i for (W_i, b_i) in params]`` as one GEMM over the concatenated kernels.

    One GEMM instead of several reads x once, runs wider (narrow projections, such as grouped
    k/v heads, underfill a GPU), and in the backward pass yields d(x) from one GEMM rather than a
    sum of several; with FP8, x is quantized once for all of them. The kernels stay separate
    parameters (the checkpoint layout does not change); their concatenation is a copy of the
    weights, small next to the activations. Needs the kernels' output axes unsharded (no tensor
    parallelism): concatenating sharded columns would interleave the shards.
    """
    kernel = jnp.concatenate([w.astype(dtype) for w, _ in params], axis=1)
    if dot_general is None:
        y = lax.dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
        y = _cotangent_written_once(y)
    else:
        y = dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if params[0][1] is not None:  # the projections of a block all have biases or none (cfg.bias)
        y = y + jnp.concatenate([b.astype(dtype) for _, b in params])
    splits = list(np.cumsum([w.shape[1] for w, _ in params])[:-1])
    return jnp.split(y, splits, axis=-1)


@jax.custom_vjp
def _cotangent_written_once(y):
    """The identity, whose cotangent is materialized once for the GEMMs that read it.

    The cotangent of a fused projection is the concatenation of its parts' gradients (dq, dk, dv).
    Both the dx and the dW GEMM read it, and XLA fused the concatenation into each of them
    separately, writing the same tensor twice: ~2.2 ms a step on base (BENCHMARKS.md, runs 17
    and 18). The barrier makes it one tensor with two readers. Not under FP8, whose backward
    reads the cotangent for its amax and its cast rather than as a GEMM operand."""
    return y


_cotangent_written_once.defvjp(lambda y: (y, None), lambda _, g: (lax.optimization_barrier(g),))


class Embed(nn.Module):
    """Token embedding, also the tied output head (SPEC 2)."""

    num_embeddings: int
    features: int
    init_std: float = 0.02
    dtype: Dtype = f32

    def setup(self):
        self.embedding = _param(self, "embedding", nn.initializers.normal(self.init_std),
                                ("vocab", "embed"), (self.num_embeddings, self.features))

    def __call__(self, idx):
        return jnp.take(self.embedding, idx, axis=0).astype(self.dtype)  # (B, T, C)

    def attend(self, x):
        """Logits in float32: the products accumulate and come out in float32 (SPEC 5)."""
        return jnp.einsum("BTC,VC->BTV", x, self.embedding.astype(self.dtype),
                          preferred_element_type=f32)


# The norms and the SwiGLU activation compute in float32 but are cheap to redo: under
# jax.checkpoint the backward pass recomputes them from their (compute-dtype) inputs, which are
# kept anyway, instead of keeping float32 intermediates. This halves activation memory at no
# measurable cost (a remat of elementwise ops only, not of matmuls). A custom VJP that saved the
# RMSNorm's row statistic instead was slower: XLA then split the forward into a reduction and an
# elementwise pass, and the backward kept its own row reduction (BENCHMARKS.md, run 18).
@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _rms_norm(x, w, eps, dtype):
    xf = x.astype(f32)
    return (w * (xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps))).astype(dtype)


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _layer_norm(x, w, b, eps, dtype):
    xf = x.astype(f32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * lax.rsqrt(var + eps) * w + b).astype(dtype)


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _dyt(x, alpha, w, b, dtype):
    return (jnp.tanh(alpha * x.astype(f32)) * w + b).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _swiglu(gate_up, round_halves: bool, kernel: bool = False):
    """silu(gate) * up in float32 from the fused projection (..., 2, F) = (up, gate), cast back
    to its dtype. Only ``gate_up``, kept anyway as the GEMM's output, is saved for the backward,
    which writes the gradient of the whole fused tensor in one elementwise pass.

    ``round_halves`` rounds each half of that gradient to ``gate_up``'s dtype before they are
    joined, for when the gradient feeds more than a GEMM (FP8: an amax reduction and a cast).
    XLA then splits the pass and writes the halves in between, in bf16 rather than float32: +4%
    on base's FP8 step. Without FP8 the one pass stays whole and the rounding after the join is
    faster: 2% on base's bf16 step (H100; BENCHMARKS.md, run 11). The values are the same.

    ``kernel`` runs the backward as one Pallas kernel (swamla_jax.mlp_kernels) where it takes
    the shape; same formula, rounded once at the end like XLA's unrounded form."""
    up, gate = gate_up[..., 0, :].astype(f32), gate_up[..., 1, :].astype(f32)
    return (gate * jax.nn.sigmoid(gate) * up).astype(gate_up.dtype)


def _swiglu_fwd(gate_up, round_halves, kernel):
    return _swiglu(gate_up, round_halves, kernel), gate_up


def swiglu_grads(up, gate, d):
    """(d up, d gate) in float32; silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g)."""
    sig = jax.nn.sigmoid(gate)
    return d * gate * sig, d * up * sig * (1.0 + gate * (1.0 - sig))


def _swiglu_select_grad(gate_up, d_out, round_halves: bool):
    """The gradient of the fused (..., 2, F) tensor in one elementwise pass that selects each
    element's half. Stacking the two halves, or autodiff's sum of two zero-padded halves, ran at
    1.4 / 2.3 TB/s against a select's 2.8 (H100, benchmarks/bench_passes.py; BENCHMARKS.md,
    run 10).

    Without FP8, every element reads its own value and its partner in the other half (a
    reversed view of the same tensor) and computes its own half's formula, so nothing in the
    pass has the (..., 1, F) shape of one half. Computed once per half and broadcast, on an H200
    XLA would not redo each half's sigmoid for both outputs: it wrote a float32 half between two
    passes, 2.2 GB a layer on base instead of 1.0, and the step was 2.4% slower (run 16). FP8
    keeps that form: it rounds each half before the select, and the pass is split anyway."""
    dt, axis = gate_up.dtype, gate_up.ndim - 2
    is_up = lax.broadcasted_iota(jnp.int32, gate_up.shape, axis) == 0
    if round_halves:
        up, gate = gate_up[..., 0:1, :].astype(f32), gate_up[..., 1:2, :].astype(f32)
        d = d_out[..., None, :].astype(f32)
    else:
        own, other = gate_up.astype(f32), lax.rev(gate_up, (axis,)).astype(f32)
        up, gate = jnp.where(is_up, own, other), jnp.where(is_up, other, own)
        d = jnp.broadcast_to(d_out[..., None, :], gate_up.shape).astype(f32)
    d_up, d_gate = swiglu_grads(up, gate, d)
    if round_halves:
        d_up, d_gate = d_up.astype(dt), d_gate.astype(dt)
    return jnp.where(is_up, d_up, d_gate).astype(dt)


def _swiglu_bwd(round_halves, kernel, gate_up, d_out):
    if kernel:
        from swamla_jax import mlp_kernels

        if mlp_kernels.supported(gate_up.shape):
            return (mlp_kernels.swiglu_grad(gate_up, d_out),)
    # The barrier keeps XLA from merging the float32 casts of the gradient with the forward's:
    # merged, a float32 copy of the gate lived from forward to backward (+0.4 GB a layer on base).
    return (_swiglu_select_grad(lax.optimization_barrier(gate_up), d_out, round_halves),)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class RMSNorm(nn.Module):
    """``w * x * rsqrt(mean(x^2) + eps)`` in float32, cast to the compute dtype."""

    eps: float
    dtype: Dtype = f32

    @nn.compact
    def __call__(self, x):
        w = _param(self, "weight", nn.initializers.ones, ("norm",), (x.shape[-1],))
        return _rms_norm(x, w, self.eps, self.dtype)


class LayerNorm(nn.Module):
    """Standard LayerNorm (eps 1e-5) in float32; names match PyTorch (``weight``, ``bias``)."""

    eps: float = 1e-5
    dtype: Dtype = f32

    @nn.compact
    def __call__(self, x):
        n = x.shape[-1]
        w = _param(self, "weight", nn.initializers.ones, ("norm",), (n,))
        b = _param(self, "bias", nn.initializers.zeros, ("norm",), (n,))
        return _layer_norm(x, w, b, self.eps, self.dtype)


class DynamicTanh(nn.Module):
    """DyT (Zhu et al. 2025): ``tanh(alpha * x) * w + b`` with a learned scalar alpha."""

    alpha_init: float
    dtype: Dtype = f32

    @nn.compact
    def __call__(self, x):
        n = x.shape[-1]
        alpha = _param(self, "alpha", nn.initializers.constant(self.alpha_init), (), ())
        w = _param(self, "weight", nn.initializers.ones, ("norm",), (n,))
        b = _param(self, "bias", nn.initializers.zeros, ("norm",), (n,))
        return _dyt(x, alpha, w, b, self.dtype)


def block_norm(cfg: ModelConfig, dtype, name: str) -> nn.Module:
    if cfg.use_dyt:
        return DynamicTanh(cfg.dyt_alpha_init, dtype=dtype, name=name)
    return RMSNorm(cfg.norm_eps, dtype=dtype, name=name)


def latent_norm(cfg: ModelConfig, dtype, name: str) -> nn.Module:
    """Norm on MLA latents: LayerNorm, or DeepSeek's weight-only RMSNorm."""
    if cfg.mla_norm == "layernorm":
        return LayerNorm(dtype=dtype, name=name)
    return RMSNorm(cfg.norm_eps, dtype=dtype, name=name)


def rope_tables(dim: int, positions: jax.Array, theta: float, factor: float):
    """cos/sin of ``a = (t / factor) * theta ** (-2p / dim)``, float32, each (T, P)."""
    inv_freq = theta ** (-jnp.arange(0, dim, 2, dtype=f32) / dim)
    angles = (positions.astype(f32) / factor)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs ``(x[2p], x[2p+1])`` of x (B, T, H, D) in float32 (SPEC 3)."""
    xf = x.astype(f32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, P)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, P)
    out = jnp.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def logit_scale(cfg: ModelConfig, positions: jax.Array) -> jax.Array:
    """Per-position query scale for long context (SPEC 3.1), float32 (T,)."""
    base = cfg.logit_scale_base
    steps = jnp.floor((positions.astype(f32) + cfg.logit_scale_offset) / cfg.logit_scale_window)
    scale = jnp.log(base + steps) / math.log(base)
    return jnp.clip(scale, cfg.logit_scale_min, cfg.logit_scale_max)


def resolve_mlp_impl(name: str, dtype, dot_general=None) -> str:
    """The one place SwiGLU's backward kernel is chosen: the Pallas kernel on GPU in 16-bit
    without FP8 (``auto``; FP8 rounds the gradient's halves for its own passes), else XLA's.
    ``pallas`` off GPU runs in Pallas' interpreter (slow; for tests)."""
    if name not in MLP_IMPLS:
        raise ValueError(f"mlp_impl must be one of {MLP_IMPLS}, got {name!r}")
    if name == "auto":
        fast_ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and dot_general is None
        return "pallas" if fast_ok and jax.default_backend() == "gpu" else "xla"
    return name


class SwiGLU(nn.Module):
    """``(silu(gate) * up) W_down`` with up and gate from one fused projection (SPEC 4)."""

    cfg: ModelConfig
    dtype: Dtype = f32
    deterministic: bool = True
    dot_general: Callable | None = None
    impl: str = "xla"  # the backward's kernel (resolve_mlp_impl)

    @nn.compact
    def __call__(self, x):
        cfg, h = self.cfg, self.cfg.mlp_hidden
        lin = dict(use_bias=cfg.bias, init_std=cfg.init_std, dtype=self.dtype,
                   dot_general=self.dot_general)
        # The fused [up | gate] kernel, stored (C, 2F) as in the portable format, is multiplied
        # as (C, 2, F) with F the axis the `mlp` rule shards: under tensor parallelism each
        # device then holds the up *and* gate columns of its slice of F, and the activation
        # needs no communication. Sharding the flat 2F axis put up and gate on different
        # devices and moved half of every MLP activation (4 x H200, tensor 2: 0.56x per GPU).
        gu = Linear(2 * h, ("embed", "mlp"), name="gate_up_proj", view=(2, h),
                    view_axes=("embed", None, "mlp"), **lin)(x)  # (B, T, 2, F): up, gate
        # A dot_general other than XLA's is FP8's, which quantizes the gradient of gu.
        act = _swiglu(gu, self.dot_general is not None, self.impl == "pallas")
        y = Linear(cfg.n_embd, ("mlp", "embed"), name="down_proj", **lin)(act)
        return nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
