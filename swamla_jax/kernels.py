"""Fast GPU attention for SWA-MLA through cuDNN's flash attention (SPEC.md section 3).

Shapes: B batch, T time, N query heads, K kv heads, G = N / K, D head dim, V value dim, S sink.

* SWA (window + sink): cuDNN's sliding window computes the window part and really skips the
  tiles outside it, so cost per token is flat in T. The ``swa_sink_size`` sink keys that fall out of
  the window are a tiny explicit attention; the two parts merge through their log-sum-exps. The
  backward pass is the split-KV rule of flash attention: one cuDNN backward of the window part,
  given the *merged* output and LSE as its saved statistics, yields exactly the window keys' share
  of the merged gradient (its probabilities ``exp(s - lse)`` are the merged ones and its
  ``D_i = dO_i . O_i`` is the merged row term), and the sink keys' share is the same few lines in
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
    (dq, dk, dv) for ``P = exp(scale * q.k - lse)`` and the row term ``D = sum(d_out * out)``."""
    cudnn = _cudnn()
    if not hasattr(cudnn, "_dot_product_attention_bwd_rule"):
        raise RuntimeError(
            f"this JAX ({jax.__version__}) has no cuDNN attention backward rule to call with given "
            "statistics (jax._src.cudnn.fused_attention_stablehlo._dot_product_attention_bwd_rule, "
            "present in JAX 0.10 and 0.11): pin jax to a version this project supports, or use "
            "attention_impl='reference'")
    unused = jnp.zeros(0, q.dtype)
    # The residuals of cuDNN's forward rule, in its order: q, k, v, bias, q/kv seqlens, q/kv
    # offsets, k/v page tables, the softmax statistics (LSE, (B, N, T) float32), the output.
    res = (q, k, v) + (unused,) * 7 + (lse, out)
    grads = cudnn._dot_product_attention_bwd_rule(
        scale, 0, 0.0, (False, False), cudnn.MaskType.CAUSAL, cudnn.AttentionLayout.BTNH.value,
        window, cudnn.check_cudnn_version(), False, res, d_out)
    return grads[:3]


def swa_sink_attention(q, k, v, *, scale: float, window: int, sink: int):
    """SPEC 3.1 attention on cuDNN: keys ``i - window < j <= i`` plus the first ``sink`` keys."""
    T = q.shape[1]
    S = min(sink, T)
    if S == 0 or T <= window:  # no sink key ever falls outside a window
        return _cudnn_call(q, k, v, scale, window, False)
    return _window_sink_attention(q, k, v, scale, window, S)


def _sink_scores(q, k_s, scale, window):
    """Scaled scores of every query against the S sink keys, (B, K, G, T, S) float32, -inf where
    the key lies inside the query's window (the window part counts it) or in its future."""
    B, T, N, D = q.shape
    S, K = k_s.shape[1], k_s.shape[2]
    qg = q.reshape(B, T, K, N // K, D)
    s = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k_s, preferred_element_type=f32) * scale
    i, j = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
    return jnp.where(i - j >= window, s, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _window_sink_attention(q, k, v, scale: float, window: int, S: int):
    return _window_sink_fwd(q, k, v, scale, window, S)[0]


def _window_sink_fwd(q, k, v, scale, window, S):
    B, T, N, D = q.shape
    out_w, lse_w = _cudnn_call(q, k, v, scale, window, True)
    s = _sink_scores(q, k[:, :S], scale, window)
    lse_s = jax.nn.logsumexp(s, axis=-1)  # (B, K, G, T); -inf where no sink key is visible
    p_s = jnp.exp(s - jnp.where(jnp.isfinite(lse_s), lse_s, 0.0)[..., None])
    out_s = jnp.einsum("BKGTS,BSKD->BTKGD", p_s, v[:, :S].astype(f32)).reshape(B, T, N, D)
    lse = jnp.logaddexp(lse_w, lse_s.reshape(B, N, T))
    a_w = jnp.transpose(jnp.exp(lse_w - lse), (0, 2, 1))[..., None]  # (B, T, N, 1)
    a_s = jnp.transpose(jnp.exp(lse_s.reshape(B, N, T) - lse), (0, 2, 1))[..., None]
    # The barrier keeps the backward pass reading this bf16 output: without it XLA fused the
    # cast into the backward's row sum and kept the float32 merge alive from the forward pass to
    # the backward, one float32 (B, T, N, D) per SWA layer (+2.3 GiB on base at batch 8).
    out = lax.optimization_barrier((a_w * out_w.astype(f32) + a_s * out_s).astype(q.dtype))
    return out, (q, k, v, out, lse)


def _window_sink_bwd(scale, window, S, res, d_out):
    q, k, v, out, lse = res
    dq, dk, dv = _cudnn_window_bwd(q, k, v, out, lse, d_out, scale, window)
    k_s, v_s = k[:, :S], v[:, :S]
    dq_s, dk_s, dv_s = explicit_attention_bwd(_sink_scores(q, k_s, scale, window), q, k_s, v_s,
                                              out, lse, d_out, scale)
    dq = (dq.astype(f32) + dq_s).astype(q.dtype)
    dk = dk.at[:, :S].set((dk[:, :S].astype(f32) + dk_s).astype(dk.dtype))
    dv = dv.at[:, :S].set((dv[:, :S].astype(f32) + dv_s).astype(dv.dtype))
    return dq, dk, dv


def explicit_attention_bwd(s, q, k, v, out, lse, d_out, scale):
    """Flash attention's backward for the keys behind the scores ``s`` (B, K, G, T, S), -inf where
    masked, given the saved statistics of the whole attention (its output and LSE): with
    ``P = exp(s - lse)`` and ``dS = P (dO . v - sum(dO * out))``, (dq, dk, dv) in float32."""
    B, T, N, D = q.shape
    K = k.shape[2]
    p = jnp.exp(s - lse.reshape(B, K, N // K, T)[..., None])
    do = d_out.reshape(B, T, K, N // K, -1)
    row = jnp.einsum("BTKGD,BTKGD->BKGT", do, out.reshape(do.shape), preferred_element_type=f32)
    dp = jnp.einsum("BTKGD,BSKD->BKGTS", do, v, preferred_element_type=f32)
    ds = p * (dp - row[..., None]) * scale
    dq = jnp.einsum("BKGTS,BSKD->BTKGD", ds, k.astype(f32)).reshape(B, T, N, D)
    dk = jnp.einsum("BKGTS,BTKGD->BSKD", ds, q.reshape(B, T, K, N // K, D).astype(f32))
    dv = jnp.einsum("BKGTS,BTKGD->BSKD", p, do.astype(f32))
    return dq, dk, dv


_window_sink_attention.defvjp(_window_sink_fwd, _window_sink_bwd)


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
