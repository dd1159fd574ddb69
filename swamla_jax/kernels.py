"""Fast GPU attention for SWA-MLA through cuDNN's flash attention (SPEC.md section 3).

Shapes: B batch, T time, N query heads, K kv heads, G = N / K, D head dim, V value dim, S sink.

* SWA (window + sink): cuDNN's sliding window computes the window part and really skips the
  tiles outside it, so cost per token is flat in T. The ``swa_sink_size`` sink keys that fall out of
  the window are a tiny explicit attention; the two parts merge through their log-sum-exps. cuDNN
  returns the LSE (float32) but gives it no gradient, so :func:`_window_attention` carries a
  ``custom_vjp`` that adds it: for ``L = sum_i g_i lse_i``, ``dL/dq_i = g_i * scale * sum_j P_ij k_j``
  (an attention with values k) and ``dL/dk_j = scale * sum_i g_i P_ij q_i`` (the value-gradient of
  an attention whose output cotangent is ``g * scale * q``). Everything else is plain JAX autodiff.
* MLA (qk 192 / v 128): cuDNN's MLA mode when the installed cuDNN has it (>= 9.10, Hopper), else
  the value is zero-padded to the qk head dim.

cuDNN is reached through ``jax._src.cudnn`` because the public ``jax.nn.dot_product_attention``
casts the LSE to bfloat16 and rejects qk/v head dims that differ; both JAX 0.10 and 0.11 ship it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _window_attention(q, k, v, scale: float, window: int):
    """(out (B,T,N,D), lse (B,N,T) float32) of causal attention over the last ``window`` keys."""
    return _cudnn_call(q, k, v, scale, window, True)


def _window_fwd(q, k, v, scale, window):
    (out, lse), vjp = jax.vjp(lambda q, k, v: _cudnn_call(q, k, v, scale, window, True), q, k, v)
    return (out, lse), (q, k, vjp)


def _window_bwd(scale, window, res, cotangents):
    q, k, vjp = res
    d_out, d_lse = cotangents
    dq, dk, dv = vjp((d_out, jnp.zeros_like(d_lse)))  # cuDNN's own backward ignores d_lse
    g = jnp.transpose(d_lse, (0, 2, 1))[..., None] * scale  # (B, T, N, 1)
    probs_k = _cudnn_call(q, k, k, scale, window, False)  # sum_j P_ij k_j, (B, T, N, D)
    dq = dq + (g * probs_k.astype(f32)).astype(dq.dtype)
    _, _, dk_lse = vjp(((g * q.astype(f32)).astype(q.dtype), jnp.zeros_like(d_lse)))
    return dq, dk + dk_lse, dv


_window_attention.defvjp(_window_fwd, _window_bwd)


def swa_sink_attention(q, k, v, *, scale: float, window: int, sink: int):
    """SPEC 3.1 attention on cuDNN: keys ``i - window < j <= i`` plus the first ``sink`` keys."""
    T = q.shape[1]
    out_w, lse_w = _window_attention(q, k, v, scale, window)
    if sink == 0 or T <= window:
        return out_w
    S = min(sink, T)
    return _merge_sink(q, k[:, :S], v[:, :S], out_w, lse_w, scale, window)


@functools.partial(jax.checkpoint, static_argnums=(5, 6))
def _merge_sink(q, k_s, v_s, out_w, lse_w, scale: float, window: int):
    """The window output merged with the sink keys a query sees *outside* its window (j < S and
    i - j >= window) through the two log-sum-exps. Recomputed in the backward pass from its
    inputs, which cuDNN keeps anyway: kept, its float32 intermediates cost two float32 copies of
    the attention output per SWA layer (3 GiB on base at batch 8)."""
    B, T, N, D = q.shape
    S, K = k_s.shape[1], k_s.shape[2]
    qg = q.reshape(B, T, K, N // K, D)
    s = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k_s, preferred_element_type=f32) * scale
    i, j = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
    s = jnp.where(i - j >= window, s, -jnp.inf)
    lse_s = jax.nn.logsumexp(s, axis=-1)  # (B, K, G, T); -inf where no sink key is visible
    p_s = jnp.exp(s - jnp.where(jnp.isfinite(lse_s), lse_s, 0.0)[..., None])
    out_s = jnp.einsum("BKGTS,BSKD->BTKGD", p_s, v_s.astype(f32)).reshape(B, T, N, D)
    lse_s = lse_s.reshape(B, N, T)
    lse = jnp.logaddexp(lse_w, lse_s)
    a_w = jnp.transpose(jnp.exp(lse_w - lse), (0, 2, 1))[..., None]  # (B, T, N, 1)
    a_s = jnp.transpose(jnp.exp(lse_s - lse), (0, 2, 1))[..., None]
    return (a_w * out_w.astype(f32) + a_s * out_s).astype(q.dtype)


def causal_attention(q, k, v, *, scale: float):
    """Causal flash attention; v may have a smaller head dim than q/k (MLA)."""
    Dqk, Dv = q.shape[-1], v.shape[-1]
    if Dv == Dqk:
        return _cudnn_call(q, k, v, scale, None, False)
    try:
        return _cudnn_call(q, k, v, scale, None, False)  # cuDNN's own MLA mode
    except (NotImplementedError, ValueError):
        pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, Dqk - Dv)))
        return _cudnn_call(q, k, pad, scale, None, False)[..., :Dv]
