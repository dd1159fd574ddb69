"""FP8 matmuls for ``--use_fp8``: XLA ``dot_general`` directly on float8 operands.

Recipe: *current* per-tensor scaling. Each operand is scaled by ``amax / fp8_max`` computed from
the tensor itself and rounded to float8 (e4m3 for activations and weights in the forward pass,
e5m2, with its wider range, for the gradients in the backward pass); the ``dot_general`` takes the
float8 arrays and produces bfloat16, and the product of the two scales is applied to its output.
XLA lowers a float8 ``dot_general`` to a cuBLASLt FP8 GEMM (``__cublas$lt$matmul$f8`` in the
compiled HLO; a GPU test and the benchmark assert it, so a silent bf16 fallback fails). The
quantize-dequantize-dot pattern that XLA's GEMM rewriter is documented to fuse was measured here
(JAX 0.11.2, H100) to stay a bf16 GEMM, hence the explicit float8 operands.
We chose current over delayed scaling (amax history, as in ``flax.linen.fp8_ops``):
no extra state in checkpoints or in the parameter tree, no stale scale after a resume or a loss
spike, and the amax reduction fuses into the op that produces the tensor. Delayed scaling was
built and measured (commit ffe2abe: per-GEMM histories, calibration, checkpointed), hoping XLA
would fold each cast into the op producing its tensor: on base at sequence 2048 (H100) it ran
80.5K tokens/s against current scaling's 82.3K, so it was taken out again (BENCHMARKS.md, run 8).
Its profile (run 11) shows why: it moved 21 GB a step less than its parent, but XLA merged
the amax reductions of the attention projections' gradients, eight layers at a time, into three
kernels that ran at ~0.2 TB/s (13.6 ms a step). With each amax pinned to its cast by an
optimization barrier (run 12) it ran 84.2K against current scaling's 82.5K in one run: 2%, for
state in every checkpoint and a calibration pass, and still short of 1.2x over bf16, so current
scaling stays. The forward saves the float8 operands for the backward pass, so the activations
kept for it are half the bf16 size.
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
    """A ``dot_general`` for :class:`swamla_jax.layers.Linear`: x (..., in) . W (in, out...)."""
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim < 2:
        raise ValueError(f"fp8_dot_general supports x (..., in) . W (in, out...) only, got "
                         f"dimension_numbers {dimension_numbers}")
    del precision, preferred_element_type
    return fp8_matmul(lhs, rhs)
