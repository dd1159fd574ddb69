"""Linear, embedding, norms, RoPE and the SwiGLU MLP of SWA-MLA in Flax (SPEC.md 3 and 4).

Shapes: B batch, T time, C model width, V vocabulary, H heads, D head dim, P = D/2 rotation
pairs, F MLP hidden width; a linear's kernel w is (I, O) for I input and O output features.

Every layer takes the model config's numbers and the compute plan (``swamla.plan``), which says
in what dtype and through which kernels it computes; the default plan is the float32 reference.
Every parameter names its logical axes; how they map to mesh axes is decided by the trainer's
sharding rules, never here. Kernels are stored ``[I, O]`` (the transpose of PyTorch's).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from swamla.config import ModelConfig
from swamla.plan import REFERENCE_PLAN, ComputePlan
from swamla_jax.kernels import swiglu as swiglu_kernel
from swamla_jax.kernels.projections import linear, linear_params
from swamla_jax.kernels.swiglu import swiglu_grads

f32 = jnp.float32


def compute_dtype(plan: ComputePlan):
    return jnp.dtype(plan.compute_dtype)


def _param(module, name, init, axes, shape, dtype=f32):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Linear(nn.Module):
    """``y = x w (+ b)`` in the plan's compute dtype, as FP8 GEMMs where ``plan.fp8``.

    With ``view`` the (I, features) kernel is multiplied as (I, *view) with logical axes
    ``view_axes``, and y comes out (..., *view): the stored layout stays, the sharding of the
    product follows the view (see SwiGLU).
    """

    cfg: ModelConfig
    features: int
    axes: tuple[str, str]
    plan: ComputePlan = REFERENCE_PLAN
    view: tuple[int, ...] | None = None
    view_axes: tuple[str | None, ...] | None = None

    @nn.compact
    def __call__(self, x):
        kernel, bias = linear_params(self, x.shape[-1])
        if self.view is not None:
            kernel = nn.with_logical_constraint(kernel.reshape(x.shape[-1], *self.view),
                                                self.view_axes)
        return linear(x, kernel, bias, self.plan)


class Embed(nn.Module):
    """Token embedding, also the tied output head (SPEC 2)."""

    cfg: ModelConfig
    plan: ComputePlan = REFERENCE_PLAN

    def setup(self):
        cfg = self.cfg
        self.embedding = _param(self, "embedding", nn.initializers.normal(cfg.init_std),
                                ("vocab", "embed"), (cfg.vocab_size, cfg.n_embd))

    def __call__(self, idx):
        return jnp.take(self.embedding, idx, axis=0).astype(compute_dtype(self.plan))  # (B, T, C)

    def attend(self, x):
        """Logits (B, T, V) in float32: the products accumulate and come out in float32 (SPEC 5)."""
        return jnp.einsum("BTC,VC->BTV", x, self.embedding.astype(compute_dtype(self.plan)),
                          preferred_element_type=f32)


# The norms and the SwiGLU activation compute in float32 but are cheap to redo: under
# jax.checkpoint the backward pass recomputes them from their (compute-dtype) inputs, which are
# kept anyway, instead of keeping float32 intermediates: half the activation memory at no
# measurable cost (a remat of elementwise ops only, not of matmuls). A custom VJP saving the
# RMSNorm's row statistic instead is slower: XLA splits the forward into a reduction and an
# elementwise pass, and the backward keeps its own row reduction.
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
    faster: 2% on base's bf16 step (H100). The values are the same.

    ``kernel`` runs the backward as one Pallas kernel (``swamla_jax.kernels.swiglu``) where it
    takes the shape; same formula, rounded once at the end like XLA's unrounded form."""
    up, gate = gate_up[..., 0, :].astype(f32), gate_up[..., 1, :].astype(f32)
    return (gate * jax.nn.sigmoid(gate) * up).astype(gate_up.dtype)


def _swiglu_fwd(gate_up, round_halves, kernel):
    return _swiglu(gate_up, round_halves, kernel), gate_up


def _swiglu_select_grad(gate_up, d_out, round_halves: bool):
    """The gradient of the fused (..., 2, F) tensor in one elementwise pass that selects each
    element's half. Stacking the two halves, or autodiff's sum of two zero-padded halves, run at
    1.4 / 2.3 TB/s against a select's 2.8 (H100, benchmarks/bench_passes.py).

    Without FP8, every element reads its own value and its partner in the other half (a
    reversed view of the same tensor) and computes its own half's formula, so nothing in the
    pass has the (..., 1, F) shape of one half. Computed once per half and broadcast, XLA (H200)
    does not redo each half's sigmoid for both outputs but writes a float32 half between two
    passes: 2.2 GB a layer on base instead of 1.0, 2.4% of the step. FP8 keeps that form: it
    rounds each half before the select, and the pass is split anyway."""
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
    if kernel and swiglu_kernel.supported(gate_up.shape):
        return (swiglu_kernel.swiglu_grad(gate_up, d_out),)
    # The barrier keeps XLA from merging the float32 casts of the gradient with the forward's:
    # merged, a float32 copy of the gate lives from forward to backward (+0.4 GB a layer on base).
    return (_swiglu_select_grad(lax.optimization_barrier(gate_up), d_out, round_halves),)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class RMSNorm(nn.Module):
    """``w * x * rsqrt(mean(x^2) + eps)`` in float32, cast to the compute dtype."""

    eps: float
    plan: ComputePlan = REFERENCE_PLAN

    @nn.compact
    def __call__(self, x):
        w = _param(self, "weight", nn.initializers.ones, ("norm",), (x.shape[-1],))
        return _rms_norm(x, w, self.eps, compute_dtype(self.plan))


class LayerNorm(nn.Module):
    """Standard LayerNorm (eps 1e-5) in float32; names match PyTorch (``weight``, ``bias``)."""

    eps: float = 1e-5
    plan: ComputePlan = REFERENCE_PLAN

    @nn.compact
    def __call__(self, x):
        n = x.shape[-1]
        w = _param(self, "weight", nn.initializers.ones, ("norm",), (n,))
        b = _param(self, "bias", nn.initializers.zeros, ("norm",), (n,))
        return _layer_norm(x, w, b, self.eps, compute_dtype(self.plan))


class DynamicTanh(nn.Module):
    """DyT (Zhu et al. 2025): ``tanh(alpha * x) * w + b`` with a learned scalar alpha."""

    alpha_init: float
    plan: ComputePlan = REFERENCE_PLAN

    @nn.compact
    def __call__(self, x):
        n = x.shape[-1]
        alpha = _param(self, "alpha", nn.initializers.constant(self.alpha_init), (), ())
        w = _param(self, "weight", nn.initializers.ones, ("norm",), (n,))
        b = _param(self, "bias", nn.initializers.zeros, ("norm",), (n,))
        return _dyt(x, alpha, w, b, compute_dtype(self.plan))


def block_norm(cfg: ModelConfig, plan: ComputePlan, name: str | None = None) -> nn.Module:
    """Norm on the residual stream: RMSNorm, or DyT (SPEC 4)."""
    if cfg.use_dyt:
        return DynamicTanh(cfg.dyt_alpha_init, plan, name=name)
    return RMSNorm(cfg.norm_eps, plan, name=name)


def latent_norm(cfg: ModelConfig, plan: ComputePlan, name: str | None = None) -> nn.Module:
    """Norm on MLA latents: LayerNorm, or DeepSeek's weight-only RMSNorm."""
    if cfg.mla_norm == "layernorm":
        return LayerNorm(plan=plan, name=name)
    return RMSNorm(cfg.norm_eps, plan, name=name)


def rope_tables(dim: int, positions: jax.Array, theta: float, factor: float):
    """cos/sin of ``a = (t / factor) * theta ** (-2p / dim)``, float32, each ``positions.shape``
    + (P,): (T, P) for one shared row of positions, (B, T, P) for per-row positions (decoding)."""
    inv_freq = theta ** (-jnp.arange(0, dim, 2, dtype=f32) / dim)
    angles = (positions.astype(f32) / factor)[..., None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs ``(x[2p], x[2p+1])`` of x (B, T, H, D) in float32 (SPEC 3);
    cos/sin (T, P) or (B, T, P) from :func:`rope_tables`."""
    xf = x.astype(f32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, P)
    cos, sin = cos[..., None, :], sin[..., None, :]  # (T, 1, P) or (B, T, 1, P)
    out = jnp.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def logit_scale(cfg: ModelConfig, positions: jax.Array) -> jax.Array:
    """Per-position query scale for long context (SPEC 3.1), float32, ``positions.shape``."""
    base = cfg.logit_scale_base
    steps = jnp.floor((positions.astype(f32) + cfg.logit_scale_offset) / cfg.logit_scale_window)
    scale = jnp.log(base + steps) / math.log(base)
    return jnp.clip(scale, cfg.logit_scale_min, cfg.logit_scale_max)


class SwiGLU(nn.Module):
    """``(silu(gate) * up) w_down`` with up and gate from one fused projection (SPEC 4)."""

    cfg: ModelConfig
    plan: ComputePlan = REFERENCE_PLAN
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg, plan, F = self.cfg, self.plan, self.cfg.mlp_hidden
        # The fused [up | gate] kernel, stored (C, 2F) as in the portable format, is multiplied
        # as (C, 2, F) with F the axis the `mlp` rule shards: under tensor parallelism each
        # device then holds the up *and* gate columns of its slice of F, and the activation
        # needs no communication. Sharding the flat 2F axis would put up and gate on different
        # devices and move half of every MLP activation (0.56x the throughput per GPU on
        # 4 x H200, tensor 2).
        gu = Linear(cfg, 2 * F, ("embed", "mlp"), plan, view=(2, F),
                    view_axes=("embed", None, "mlp"), name="gate_up_proj")(x)  # (B, T, 2, F)
        act = _swiglu(gu, plan.fp8, plan.mlp_impl == "pallas")  # FP8 quantizes d(gu) itself
        y = Linear(cfg, cfg.n_embd, ("mlp", "embed"), plan, name="down_proj")(act)
        return nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
