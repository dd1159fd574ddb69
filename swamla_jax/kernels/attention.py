"""Fast GPU attention for SWA-MLA through cuDNN's flash attention (SPEC.md section 3):
``plan.attention_impl == "cudnn"``, reached through ``swamla_jax.attention.attention``.

Shapes: B batch, T time (of queries and keys alike), H query heads, K kv heads, G = H / K heads
per kv group, D head dim, V value dim, Z sink keys; in the sink GEMMs' flattened layouts
Q = H * D and Y = H * Z. cuDNN's layout name ``BTNH`` is this file's (B, T, H, D).

* SWA (window + sink): cuDNN's sliding window computes the window part and really skips the
  tiles outside it, so cost per token is flat in T. The ``swa_sink_size`` sink keys that fall out of
  the window are a tiny explicit attention; the two parts merge through their log-sum-exps. The
  backward pass is the split-KV rule of flash attention: one cuDNN backward of the window part,
  given the *merged* output and LSE as its saved statistics, yields exactly the window keys' share
  of the merged gradient (its probabilities ``exp(s - lse)`` are the merged ones and its
  row term ``dO_i . O_i`` is the merged one), and the sink keys' share is the same few lines in
  JAX. One cuDNN backward per layer, as for plain causal attention; an LSE gradient is never
  needed.
* MLA (qk 192 / v 128): cuDNN's MLA mode when the installed cuDNN has it (>= 9.10, Hopper), else
  the value is zero-padded to the qk head dim.

cuDNN is reached through ``jax._src.cudnn`` because the public ``jax.nn.dot_product_attention``
casts the LSE to bfloat16, rejects qk/v head dims that differ, and has no backward that takes the
statistics it should use; JAX 0.10 and 0.11 ship the same module and the same backward rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32


def _cudnn():
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn
    except ImportError as e:  # a JAX build without the cuDNN attention module
        raise RuntimeError("attention_impl='cudnn' needs a JAX build with cuDNN fused attention "
                           "(jax[cuda]); use attention_impl='reference'") from e
    return cudnn


def _cudnn_call(q, k, v, scale, window, return_lse):
    cudnn = _cudnn()
    return cudnn.dot_product_attention(
        q, k, v, scale=scale, mask_type=cudnn.MaskType.CAUSAL,
        sliding_window_length=window, return_residual=return_lse)


def _cudnn_window_bwd(q, k, v, out, lse, d_out, scale, window):
    """cuDNN's causal sliding-window attention backward with the saved statistics given:
    (dq, dk, dv) for ``p = exp(scale * q.k - lse)`` and the row term ``sum(d_out * out)``."""
    cudnn = _cudnn()
    if not hasattr(cudnn, "_dot_product_attention_bwd_rule"):
        raise RuntimeError(
            f"this JAX ({jax.__version__}) has no cuDNN attention backward rule to call with given "
            "statistics (jax._src.cudnn.fused_attention_stablehlo._dot_product_attention_bwd_rule, "
            "present in JAX 0.10 and 0.11): pin jax to a version this project supports, or use "
            "attention_impl='reference'")
    unused = jnp.zeros(0, q.dtype)
    # The residuals of cuDNN's forward rule, in its order: q, k, v, bias, q/kv seqlens, q/kv
    # offsets, k/v page tables, the softmax statistics (LSE, (B, H, T) float32), the output.
    res = (q, k, v) + (unused,) * 7 + (lse, out)
    grads = cudnn._dot_product_attention_bwd_rule(
        scale, 0, 0.0, (False, False), cudnn.MaskType.CAUSAL, cudnn.AttentionLayout.BTNH.value,
        window, cudnn.check_cudnn_version(), False, res, d_out)
    return grads[:3]


def swa_sink_attention(q, k, v, *, scale: float, window: int, sink: int):
    """SPEC 3.1 attention on cuDNN: keys ``i - window < j <= i`` plus the first ``sink`` keys."""
    T = q.shape[1]
    Z = min(sink, T)
    if Z == 0 or T <= window:  # no sink key ever falls outside a window
        return _cudnn_call(q, k, v, scale, window, False)
    return _window_sink_attention(q, k, v, scale, window, Z)


# The sink part is Z (4 by default) keys against every query, as one GEMM per sequence over all
# heads at once, reading q and dO in their own (T, Q) = (T, H*D) layout: the sink rows sit on a
# block diagonal, (Q, Y) = (H*D, H*Z), so every head meets only its own, and the wasted blocks
# cost H times a tiny GEMM's FLOPs. Per-head einsums would be batched GEMMs over (B, H) that XLA
# feeds with transposed copies of q and dO (~1 GB a layer on base), and sums over D and T run at
# a fifth of HBM speed. The sink values and keys mixed into the output and dQ are Z
# multiply-adds inside the pass that writes them.
def _block_diagonal(x_s, H):
    """(B, Z, K, D) sink keys or values -> (B, Q, Y) = (B, H*D, H*Z): block h holds query head
    h's copy."""
    B, Z, K, D = x_s.shape
    xh = jnp.repeat(x_s, H // K, axis=2).transpose(0, 2, 3, 1)  # (B, H, D, Z)
    eye = jnp.eye(H, dtype=x_s.dtype)[:, None, :, None]
    return (xh[:, :, :, None, :] * eye).reshape(B, H * D, H * Z)


def _against_sink(x, rows):
    """``x (B, T, H, D) . rows`` per head: (B, T, H, Z) float32 for block-diagonal rows
    (B, Q, Y)."""
    B, T, H, D = x.shape
    y = jnp.einsum("BTQ,BQY->BTY", x.reshape(B, T, H * D), rows, preferred_element_type=f32)
    return y.reshape(B, T, H, -1)


def _sink_grad(w, x, K):
    """``sum_t w[:, t, h, j] x[:, t, h]`` per head, summed over each kv head's query heads:
    (B, Z, K, D) float32 from weights w (B, T, H, Z), cast to x's dtype as flash attention casts
    its probabilities and score gradients for its dV and dK GEMMs."""
    B, T, H, D = x.shape
    Z = w.shape[-1]
    y = jnp.einsum("BTY,BTQ->BYQ", w.reshape(B, T, H * Z).astype(x.dtype), x.reshape(B, T, H * D),
                   preferred_element_type=f32).reshape(B, H, Z, H, D)
    y = jnp.diagonal(y, axis1=1, axis2=3)  # (B, Z, D, H): head h against its own sink rows
    return y.reshape(B, Z, D, K, H // K).sum(-1).transpose(0, 1, 3, 2)


def _sink_scores(q, k_rows, scale, window):
    """Scaled scores of every query against the sink keys, (B, T, H, Z) float32, -inf where the
    key lies inside the query's window (the window part counts it) or in its future."""
    s = _against_sink(q, k_rows) * scale
    T, Z = s.shape[1], s.shape[3]
    i, j = jnp.arange(T)[:, None, None], jnp.arange(Z)[None, None, :]
    return jnp.where(i - j >= window, s, -jnp.inf)


def _sink_mix(w, x_s):
    """``sum_j w[..., j] x_s[:, j]``: weights w (B, T, H, Z) of the sink rows x_s (B, Z, K, D),
    (B, T, H, D) float32, unrolled so that it stays elementwise inside the pass around it."""
    B, T, H, Z = w.shape
    xh = jnp.repeat(x_s, H // x_s.shape[2], axis=2).astype(f32)  # (B, Z, H, D)
    return sum(w[..., j, None] * xh[:, None, j] for j in range(Z))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _window_sink_attention(q, k, v, scale: float, window: int, Z: int):
    return _window_sink_fwd(q, k, v, scale, window, Z)[0]


def _window_sink_fwd(q, k, v, scale, window, Z):
    H = q.shape[2]
    out_w, lse_w = _cudnn_call(q, k, v, scale, window, True)
    lse_w = jnp.swapaxes(lse_w, 1, 2)  # cuDNN's (B, H, T) -> (B, T, H), as the scores
    s = _sink_scores(q, _block_diagonal(k[:, :Z], H), scale, window)
    lse_s = jax.nn.logsumexp(s, axis=-1)  # (B, T, H); -inf where no sink key is visible
    p_s = jnp.exp(s - jnp.where(jnp.isfinite(lse_s), lse_s, 0.0)[..., None])
    lse = jnp.logaddexp(lse_w, lse_s)
    a_w, a_s = jnp.exp(lse_w - lse), jnp.exp(lse_s - lse)
    # The barrier keeps the backward pass reading this bf16 output: without it XLA fused the
    # cast into the backward's row sum and kept the float32 merge alive from the forward pass to
    # the backward, one float32 (B, T, H, D) per SWA layer (+2.3 GiB on base at batch 8).
    out = lax.optimization_barrier((a_w[..., None] * out_w.astype(f32)
                                    + a_s[..., None] * _sink_mix(p_s, v[:, :Z])).astype(q.dtype))
    return out, (q, k, v, out, jnp.swapaxes(lse, 1, 2))


def _window_sink_bwd(scale, window, Z, res, d_out):
    q, k, v, out, lse = res
    dq, dk, dv = _cudnn_window_bwd(q, k, v, out, lse, d_out, scale, window)
    H, K = q.shape[2], k.shape[2]
    # The sink keys' share of the merged gradient: flash attention's backward with the merged
    # statistics, p = exp(s - lse) and ds = p (dO . v - sum(dO * out)).
    s = _sink_scores(q, _block_diagonal(k[:, :Z], H), scale, window)
    p = jnp.exp(s - jnp.swapaxes(lse, 1, 2)[..., None])
    row = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)
    ds = p * (_against_sink(d_out, _block_diagonal(v[:, :Z], H)) - row[..., None]) * scale
    dq = (dq.astype(f32) + _sink_mix(ds, k[:, :Z])).astype(q.dtype)
    # The Z rows are updated in place; a scatter (``.at[].set``) would copy all of dk and dv.
    dk = lax.dynamic_update_slice_in_dim(
        dk, (dk[:, :Z].astype(f32) + _sink_grad(ds, q, K)).astype(dk.dtype), 0, 1)
    dv = lax.dynamic_update_slice_in_dim(
        dv, (dv[:, :Z].astype(f32) + _sink_grad(p, d_out, K)).astype(dv.dtype), 0, 1)
    return dq, dk, dv


_window_sink_attention.defvjp(_window_sink_fwd, _window_sink_bwd)


def causal_attention(q, k, v, *, scale: float):
    """Causal flash attention; v may have a smaller head dim than q/k (MLA)."""
    D, V = q.shape[-1], v.shape[-1]  # q (B, T, H, D), k (B, T, K, D), v (B, T, K, V)
    if V == D:
        return _cudnn_call(q, k, v, scale, None, False)
    try:
        return _cudnn_call(q, k, v, scale, None, False)  # cuDNN's own MLA mode
    except (NotImplementedError, ValueError):
        pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, D - V)))
        return _cudnn_call(q, k, pad, scale, None, False)[..., :V]
