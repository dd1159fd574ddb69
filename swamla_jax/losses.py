"""The SPEC 5 loss in JAX: mean token cross entropy over the tied head, whole or in chunks.

Shapes: B batch, T time, C model width, V vocabulary, n chunks.

:func:`chunked_cross_entropy` (``plan.loss_chunk > 0``) never holds float32 logits for more than
one chunk of positions, and computes the head's gradients in the same pass as the loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100
f32 = jnp.float32


def _token_losses(logits, lse, targets, label_smoothing: float):
    """SPEC 5 loss of each position from float32 logits (..., V) and their log-sum-exp (...),
    0 where the target is -100: ``-(1-e) log p_t - e/(V-1) sum_{j != t} log p_j``."""
    valid = targets != IGNORE_INDEX
    tgt = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    loss = lse - tgt  # -log p(target)
    if label_smoothing > 0.0:
        V = logits.shape[-1]
        loss = lse - (1.0 - label_smoothing) * tgt - (label_smoothing / (V - 1)) * (
            logits.sum(-1) - tgt)
    return jnp.where(valid, loss, 0.0)


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0):
    """Mean token cross entropy over targets != -100 in float32 (SPEC 5).

    With smoothing eps the target class gets weight 1 - eps and every other class eps / (V - 1).
    """
    logits = logits.astype(f32)
    loss = _token_losses(logits, jax.nn.logsumexp(logits, axis=-1), targets, label_smoothing)
    return loss.sum() / jnp.maximum((targets != IGNORE_INDEX).sum(), 1)


def _split_chunks(a, chunk: int, fill):
    """(B, T, ...) -> (n, B, chunk, ...) padded with ``fill`` to a whole number of chunks."""
    B, T = a.shape[:2]
    n = -(-T // chunk)
    pad = [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (a.ndim - 2)
    a = jnp.pad(a, pad, constant_values=fill)
    return a.reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)


def _chunk_logits(xc, emb):
    """Tied-head logits of one chunk: compute-dtype operands, float32 products (SPEC 5)."""
    return jnp.einsum("BTC,VC->BTV", xc, emb, preferred_element_type=f32)


def _lse_combine(a, b):
    """Merge two (running max, sum of exp(x - max)) pairs, one exponential per merge."""
    (ma, sa), (mb, sb) = a, b
    e = jnp.where(ma == mb, 1.0, jnp.exp(-jnp.abs(ma - mb)))  # == also covers -inf with -inf
    return jnp.maximum(ma, mb), jnp.where(ma >= mb, sa + sb * e, sb + sa * e)


def _chunk_lse(logits):
    """Log-sum-exp over the last axis in one pass over the float32 logits (an online softmax
    normalizer as one variadic reduction) rather than a max pass and then a sum pass."""
    init = (jnp.array(-jnp.inf, f32), jnp.array(0.0, f32))
    m, s = jax.lax.reduce((logits, jnp.ones_like(logits)), init, _lse_combine, (logits.ndim - 1,))
    return m + jnp.log(s)


def _chunk_loss(xc, emb, tc, label_smoothing):
    """One chunk's summed loss, with its float32 logits (B, chunk, V) and their log-sum-exp."""
    logits = _chunk_logits(xc, emb)
    lse = _chunk_lse(logits)
    return _token_losses(logits, lse, tc, label_smoothing).sum(), logits, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_loss_sum(xs, emb, ts, label_smoothing: float):
    """Summed SPEC 5 loss of the tied head over targets != -100; xs (n, B, chunk, C) and ts
    (n, B, chunk) are the positions split into n chunks, taken one at a time."""
    def body(total, xs_):
        xc, tc = xs_
        return total + _chunk_loss(xc, emb, tc, label_smoothing)[0], None

    return jax.lax.scan(body, jnp.zeros([], f32), (xs, ts))[0]


def _head_loss_fwd(xs, emb, ts, label_smoothing):
    """The loss and, in the same pass over each chunk's logits, its gradients.

    The loss is a sum, so its VJP for a cotangent ``g`` is ``g`` times the gradient for 1: the
    backward pass only scales what this computes, and each chunk's logits are made once per step
    instead of again in the backward pass (one head GEMM fewer). d(loss sum)/d logits = softmax -
    smoothed one-hot is rounded to the compute dtype (as the autocast PyTorch head does) so both
    head-gradient GEMMs run in bf16 with float32 accumulation; the gradients are kept in float32
    until scaled.
    """
    V = emb.shape[0]
    on, off = 1.0 - label_smoothing, label_smoothing / (V - 1)

    def body(carry, xs_):
        total, d_emb = carry
        xc, tc = xs_
        loss, logits, lse = _chunk_loss(xc, emb, tc, label_smoothing)
        total = total + loss
        valid = (tc != IGNORE_INDEX)[..., None]
        target = jnp.arange(V) == tc[..., None]
        d_logits = jnp.exp(logits - lse[..., None]) - jnp.where(target, on, off)
        d_logits = jnp.where(valid, d_logits, 0.0).astype(xc.dtype)  # (B, chunk, V)
        dxc = jnp.einsum("BTV,VC->BTC", d_logits, emb, preferred_element_type=f32)
        d_emb = d_emb + jnp.einsum("BTV,BTC->VC", d_logits, xc, preferred_element_type=f32)
        return (total, d_emb), dxc

    (total, d_emb), dxs = jax.lax.scan(body, (jnp.zeros([], f32), jnp.zeros(emb.shape, f32)),
                                       (xs, ts))
    dtypes = (jnp.zeros(0, xs.dtype), jnp.zeros(0, emb.dtype))  # the cotangents' dtypes
    return total, (dxs, d_emb, dtypes)


def _head_loss_bwd(label_smoothing, res, g):
    dxs, d_emb, (xs_dtype, emb_dtype) = res
    return (g * dxs).astype(xs_dtype.dtype), (g * d_emb).astype(emb_dtype.dtype), None


_head_loss_sum.defvjp(_head_loss_fwd, _head_loss_bwd)


def chunked_cross_entropy(x, embedding, targets, label_smoothing: float, chunk: int):
    """SPEC 5 mean loss through the tied head over chunks of ``chunk`` positions.

    ``x`` (B, T, C) and ``embedding`` (V, C) in the compute dtype. Float32 logits exist for one
    chunk at a time. Under differentiation the forward pass also computes the gradients from
    each chunk's logits (``_head_loss_fwd``), so they are made once a step, never stored.
    """
    xs, ts = _split_chunks(x, chunk, 0), _split_chunks(targets, chunk, IGNORE_INDEX)
    total = _head_loss_sum(xs, embedding, ts, label_smoothing)
    count = (targets != IGNORE_INDEX).sum()
    return total / jnp.maximum(count, 1)
