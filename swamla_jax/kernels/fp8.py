"""FP8 matmuls (``plan.fp8``, the trainer's ``--use_fp8``): XLA ``dot_general`` on float8 operands.

Recipe: *current* per-tensor scaling. Each operand is scaled by ``amax / fp8_max`` computed from
the tensor itself and rounded to float8 (e4m3 for activations and weights in the forward pass,
e5m2, with its wider range, for the gradients in the backward pass); the ``dot_general`` takes the
float8 arrays and produces bfloat16, and the product of the two scales is applied to its output.
XLA lowers a float8 ``dot_general`` to a cuBLASLt FP8 GEMM (``__cublas$lt$matmul$f8`` in the
compiled HLO; a GPU test and the benchmark assert it, so a silent bf16 fallback fails). The
quantize-dequantize-dot pattern that XLA's GEMM rewriter is documented to fuse stays a bf16 GEMM
(JAX 0.11.2, H100), hence the explicit float8 operands.

Current rather than delayed scaling (an amax history, as in ``flax.linen.fp8_ops``): no extra
state in checkpoints or in the parameter tree, no stale scale after a resume or a loss spike, and
the amax reduction fuses into the op that produces the tensor. Delayed scaling is at most ~2%
faster on base (H100), for that state and a calibration pass. The forward saves the float8
operands for the backward pass, so the activations kept for it are half the bf16 size.

Shapes: I input features, O output features (one or more axes): x (..., I), weight w (I, O...),
output (..., O...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
_TINY = 1e-12


def _scale(x, dtype):
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    return jnp.maximum(amax, _TINY) / jnp.finfo(dtype).max.astype(jnp.float32)


def quantize(x, dtype):
    """(float8 values, float32 scale) with ``x ~= values * scale``."""
    scale = _scale(x, dtype)
    fmax = jnp.finfo(dtype).max.astype(jnp.float32)
    q = jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(dtype)
    return q, scale


def _scaled_dot(qa, sa, qb, sb, dims, dtype):
    """``(qa * sa) . (qb * sb)`` as one float8 GEMM and a scale of its output."""
    y = lax.dot_general(qa, qb, dims, preferred_element_type=dtype)
    return y * (sa * sb).astype(dtype)


@jax.custom_vjp
def fp8_matmul(x, w):
    """``x @ w`` for x (..., I), w (I, O...) through FP8 GEMMs; output (..., O...) in x's
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
    dtype = g.dtype
    qg, sg = quantize(g, E5M2)
    n_out = qw.ndim - 1  # output axes of w
    lead = tuple(range(g.ndim - n_out))
    out_g = tuple(range(g.ndim - n_out, g.ndim))
    dx = _scaled_dot(qg, sg, qw, sw, ((out_g, tuple(range(1, qw.ndim))), ((), ())), dtype)
    dw = _scaled_dot(qx, sx, qg, sg, ((lead, lead), ((), ())), jnp.float32)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


fp8_matmul.defvjp(_fp8_fwd, _fp8_bwd)


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """A ``dot_general`` for x (..., I) . w (I, O...), what the plan's FP8 linears run."""
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim < 2:
        raise ValueError(f"fp8_dot_general supports x (..., I) . w (I, O...) only, got "
                         f"dimension_numbers {dimension_numbers}")
    del precision, preferred_element_type
    return fp8_matmul(lhs, rhs)
