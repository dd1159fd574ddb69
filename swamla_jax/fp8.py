"""FP8 matmuls for ``--use_fp8``: XLA ``dot_general`` directly on float8 operands.

Recipe: *current* per-tensor scaling. Each operand is scaled by ``amax / fp8_max`` computed from
the tensor itself and rounded to float8 (e4m3 for activations and weights in the forward pass,
e5m2, with its wider range, for the gradients in the backward pass); the ``dot_general`` takes the
float8 arrays and produces bfloat16, and the product of the two scales is applied to its output.
XLA lowers a float8 ``dot_general`` to a cuBLASLt FP8 GEMM (``__cublas$lt$matmul$f8`` in the
compiled HLO; a GPU test and the benchmark assert it, so a silent bf16 fallback fails). The
quantize-dequantize-dot pattern that XLA's GEMM rewriter is documented to fuse was measured here
(JAX 0.11.2, H100) to stay a bf16 GEMM, hence the explicit float8 operands.
The forward saves the float8 operands for the backward pass, so the activations kept for it are
half the bf16 size.

Two recipes for the activations (forward) and gradients (backward); weights always use current
scaling (they are small, and a weight's scale must follow each optimizer update):

* *current* (:func:`fp8_dot_general`): a tensor's own amax. Needs the whole tensor before it can
  be cast: the amax is one pass (fused into the producer at best) and the cast a second pass over
  the bfloat16 tensor. Measured on base (H100): these passes and the amax reductions took ~30 ms
  of a 200 ms step, most of what the FP8 GEMMs saved.
* *delayed* (:class:`DelayedScaling`, the default; Transformer Engine's recipe): the scale comes
  from the largest amax of the last N steps, known before the tensor exists, so the cast fuses
  into the op that produces the tensor and the amax for the history is a side output of that
  same pass. Each GEMM keeps its two histories in the ``fp8_stats`` collection; they reach the
  trainer as the "gradient" of that collection (the backward pass returns the updated history as
  its cotangent, as ``flax.linen.fp8_ops`` does), are saved in checkpoints, and are filled by one
  calibration pass (current scaling) before the first step of a run, so no step runs on an empty
  history. A value above a stale scale's range saturates to the float8 maximum rather than
  overflowing.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
FP8_STATS = "fp8_stats"  # the Flax collection of the delayed-scaling amax histories
_TINY = 1e-12
f32 = jnp.float32


def _amax(x):
    return jnp.max(jnp.abs(x)).astype(f32)


def _scale_of(amax, dtype):
    return jnp.maximum(amax, _TINY) / jnp.finfo(dtype).max.astype(f32)


def _cast(x, scale, dtype):
    """x / scale rounded to float8, saturating at the format's largest value."""
    fmax = jnp.finfo(dtype).max.astype(f32)
    return jnp.clip(x.astype(f32) / scale, -fmax, fmax).astype(dtype)


def quantize(x, dtype):
    """(float8 values, float32 scale) with ``x ~= values * scale`` (current scaling)."""
    scale = _scale_of(_amax(x), dtype)
    return _cast(x, scale, dtype), scale


def _scaled_dot(qa, sa, qb, sb, dims, dtype):
    """``(qa * sa) . (qb * sb)`` as one float8 GEMM and a scale of its output."""
    y = lax.dot_general(qa, qb, dims, preferred_element_type=dtype)
    return y * (sa * sb).astype(dtype)


@jax.custom_vjp
def fp8_matmul(x, w):
    """``x @ w`` for x (..., K), w (K, N...) through FP8 GEMMs; output (..., N...) in x's
    dtype (w may carry several output axes, e.g. the (C, 2, F) view of SwiGLU's projection)."""
    return _fp8_fwd(x, w)[0]


def _fp8_fwd(x, w):
    dtype = x.dtype
    qx, sx = quantize(x, E4M3)
    qw, sw = quantize(w, E4M3)
    y = _scaled_dot(qx, sx, qw, sw, (((x.ndim - 1,), (0,)), ((), ())), dtype)
    return y, (qx, sx, qw, sw, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _fp8_bwd(res, g):
    qx, sx, qw, sw, x_like, w_like = res
    qg, sg = quantize(g, E5M2)
    return _fp8_grads(qx, sx, qw, sw, qg, sg, x_like, w_like)


def _fp8_grads(qx, sx, qw, sw, qg, sg, x_like, w_like):
    """(dx, dw) of ``x @ w`` from the float8 operands and the float8 output gradient."""
    n_out = qw.ndim - 1  # output axes of w
    lead = tuple(range(qg.ndim - n_out))
    out_g = tuple(range(qg.ndim - n_out, qg.ndim))
    dx = _scaled_dot(qg, sg, qw, sw, ((out_g, tuple(range(1, qw.ndim))), ((), ())),
                     x_like.dtype)
    dw = _scaled_dot(qx, sx, qg, sg, ((lead, lead), ((), ())), f32)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


fp8_matmul.defvjp(_fp8_fwd, _fp8_bwd)


def _check_dims(lhs, rhs, dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim < 2:
        raise ValueError(f"fp8_dot_general supports x (..., in) . W (in, out...) only, got "
                         f"dimension_numbers {dimension_numbers}")


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """A ``dot_general`` for :class:`swamla_jax.layers.Linear` with current scaling:
    x (..., in) . W (in, out...)."""
    _check_dims(lhs, rhs, dimension_numbers)
    del precision, preferred_element_type
    return fp8_matmul(lhs, rhs)


# ------------------------------------------------------------------------------ delayed scaling
def _history_scale(hist, dtype):
    return _scale_of(jnp.max(hist), dtype)


def _pushed(hist, amax, calibrate: bool):
    """The history after this step: amax in front (newest first); calibration fills it."""
    if calibrate:
        return jnp.full_like(hist, amax)
    return jnp.concatenate([amax[None], hist[:-1]])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fp8_matmul_delayed(x, w, x_hist, g_hist, calibrate: bool = False):
    """``x @ w`` through FP8 GEMMs with x and the output gradient scaled from their amax
    histories (f32 (N,) each). The cotangents returned for the histories are the *updated*
    histories. ``calibrate``: scale from the tensors themselves and fill the histories."""
    return _delayed_fwd(x, w, x_hist, g_hist, calibrate)[0]


def _delayed_fwd(x, w, x_hist, g_hist, calibrate):
    amax_x = _amax(x)
    sx = _scale_of(amax_x, E4M3) if calibrate else _history_scale(x_hist, E4M3)
    qx = _cast(x, sx, E4M3)
    qw, sw = quantize(w, E4M3)
    y = _scaled_dot(qx, sx, qw, sw, (((x.ndim - 1,), (0,)), ((), ())), x.dtype)
    return y, (qx, sx, qw, sw, _pushed(x_hist, amax_x, calibrate), g_hist,
               jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _delayed_bwd(calibrate, res, g):
    qx, sx, qw, sw, x_hist_new, g_hist, x_like, w_like = res
    amax_g = _amax(g)
    sg = _scale_of(amax_g, E5M2) if calibrate else _history_scale(g_hist, E5M2)
    dx, dw = _fp8_grads(qx, sx, qw, sw, _cast(g, sg, E5M2), sg, x_like, w_like)
    return dx, dw, x_hist_new, _pushed(g_hist, amax_g, calibrate)


fp8_matmul_delayed.defvjp(_delayed_fwd, _delayed_bwd)


class DelayedScalingDot(nn.Module):
    """One GEMM's delayed-scaling FP8 ``dot_general`` and its two amax histories."""

    history: int
    calibrate: bool = False

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None):
        _check_dims(lhs, rhs, dimension_numbers)
        x_hist = self.variable(FP8_STATS, "input_amax_history", jnp.zeros, (self.history,), f32)
        g_hist = self.variable(FP8_STATS, "grad_amax_history", jnp.zeros, (self.history,), f32)
        return fp8_matmul_delayed(lhs, rhs, x_hist.value, g_hist.value, self.calibrate)


@dataclasses.dataclass(frozen=True)
class DelayedScaling:
    """The ``dot_general`` hook of FP8 with delayed scaling over ``history`` steps: a layer asks
    it for a :class:`DelayedScalingDot` of its own (``make_module``), since each GEMM has its
    own histories. ``calibrate=True`` is the calibration pass (current scaling, histories filled
    with this batch's amaxes)."""

    history: int = 16
    calibrate: bool = False

    def make_module(self, name: str) -> DelayedScalingDot:
        return DelayedScalingDot(self.history, self.calibrate, name=name)


def stats_are_empty(stats) -> bool:
    """True when no history holds an amax yet (a fresh or imported state): calibrate first."""
    leaves = jax.tree_util.tree_leaves(stats)
    return bool(leaves) and not any(float(jnp.max(leaf)) > 0 for leaf in leaves)
