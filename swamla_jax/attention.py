"""SWA and MLA attention of SWA-MLA in Flax (SPEC.md section 3).

Shapes: B batch, T query time, S key time, C model width, H query heads, K kv heads,
G = H / K heads per kv group, D head dim, R kv latent rank, N nope dim, E rope dim, V value dim.

Which attention kernel runs is decided in :func:`attention` alone; the blocks only describe the
mask (causal, window, sink).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from swamla.config import ModelConfig
from swamla_jax.layers import (Dtype, Linear, LinearParams, apply_rope, f32, fused_projections,
                               latent_norm, logit_scale)


def visible_mask(T: int, S: int, window: int | None, sink: int) -> jax.Array:
    """(T, S) bool: query i sees key j iff j <= i and (i - j < window or j < sink) (SPEC 3.1).

    Queries are the last T of the S key positions (S == T without a cache).
    """
    i = jnp.arange(S - T, S)[:, None]
    j = jnp.arange(S)[None, :]
    mask = j <= i
    if window is not None:
        mask &= (i - j < window) | (j < sink)
    return mask


ATTENTION_IMPLS = ("auto", "reference", "cudnn")


def resolve_attention_impl(name: str, dtype, dropout: float) -> str:
    """The one place a kernel is chosen: cuDNN flash attention on GPU in 16-bit without dropout
    (``auto``), else the reference path, which runs anywhere and is exact in float32."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {name!r}")
    fast_ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and dropout == 0.0
    if name == "auto":
        return "cudnn" if fast_ok and jax.default_backend() == "gpu" else "reference"
    if name == "cudnn" and not fast_ok:
        raise ValueError("attention_impl='cudnn' needs a bfloat16/float16 compute dtype and "
                         "dropout 0; use attention_impl='reference' (or 'auto')")
    return name


def attention(q, k, v, *, scale: float, window: int | None = None, sink: int = 0,
              dropout_rate: float = 0.0, dropout_rng=None, impl: str = "reference") -> jax.Array:
    """Causal (optionally windowed + sink) attention; q (B,T,H,D), k (B,S,K,D), v (B,S,K,V).

    ``impl="reference"``: explicit float32 scores and softmax, exact to the SPEC on any backend.
    ``impl="cudnn"``: flash attention that skips what lies outside the window (swamla_jax.kernels).
    """
    if impl == "cudnn":
        from swamla_jax import kernels

        if window is None:
            return kernels.causal_attention(q, k, v, scale=scale)
        return kernels.swa_sink_attention(q, k, v, scale=scale, window=window, sink=sink)
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    qg = q.reshape(B, T, K, H // K, D)  # head h reads kv head h // G
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k, preferred_element_type=f32) * scale
    scores = jnp.where(visible_mask(T, S, window, sink), scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("BKGTS,BSKV->BTKGV", probs.astype(v.dtype), v)
    return out.reshape(B, T, H, v.shape[-1])


class SWAttention(nn.Module):
    """Sliding-window attention with an attention sink, RoPE and grouped-query heads (SPEC 3.1)."""

    cfg: ModelConfig
    dtype: Dtype = f32
    deterministic: bool = True
    dot_general: Callable | None = None
    attention_impl: str = "reference"
    fuse_projections: bool = False

    @nn.compact
    def __call__(self, x, rope, positions):
        cfg = self.cfg
        B, T, C = x.shape
        H, K, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        lin = dict(use_bias=cfg.bias, init_std=cfg.init_std, dtype=self.dtype,
                   dot_general=self.dot_general)
        q, k, v = _project(self, x, (("q_proj", H * D, ("embed", "q_heads")),
                                     ("k_proj", K * D, ("embed", "kv_heads")),
                                     ("v_proj", K * D, ("embed", "kv_heads"))))
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, K, D), v.reshape(B, T, K, D)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cfg.logit_scale_base is not None and (self.deterministic
                                                 or cfg.apply_logit_scale_during_training):
            q = (q.astype(f32) * logit_scale(cfg, positions)[:, None, None]).astype(q.dtype)
        y = attention(q, k, v, scale=D ** -0.5, window=cfg.swa_window, sink=cfg.swa_sink_size,
                      impl=self.attention_impl, **_dropout(self, cfg))
        y = Linear(C, ("q_heads", "embed"), name="o_proj", **lin)(y.reshape(B, T, H * D))
        return nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention, expanded form (SPEC 3.2)."""

    cfg: ModelConfig
    dtype: Dtype = f32
    deterministic: bool = True
    dot_general: Callable | None = None
    attention_impl: str = "reference"
    fuse_projections: bool = False

    @nn.compact
    def __call__(self, x, rope, positions):
        cfg = self.cfg
        B, T, C = x.shape
        H, dn, dv, r = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        dqk, dr = cfg.mla_qk_head_dim, cfg.qk_rope_head_dim
        lin = dict(use_bias=cfg.bias, init_std=cfg.init_std, dtype=self.dtype,
                   dot_general=self.dot_general)
        # The query projection (or its low-rank first half) and the kv down-projection both
        # read x: one GEMM when fused.
        latent_spec = ("wkv_a", r + dr, ("embed", "kv_lora"))
        if cfg.q_lora_rank:
            q, latent = _project(self, x, (("wq_a", cfg.q_lora_rank, ("embed", "q_lora")),
                                           latent_spec))
            q = latent_norm(cfg, self.dtype, "q_norm")(q)
            q = Linear(H * dqk, ("q_lora", "q_heads"), name="wq_b", **lin)(q)
        else:
            q, latent = _project(self, x, (("wq", H * dqk, ("embed", "q_heads")), latent_spec))
        q = q.reshape(B, T, H, dqk)  # latent: (B, T, R+E)
        cos, sin = rope
        q = jnp.concatenate((q[..., :dn], apply_rope(q[..., dn:], cos, sin)), axis=-1)
        c = latent_norm(cfg, self.dtype, "kv_norm")(latent[..., :r])  # (B, T, R)
        k_pe = apply_rope(latent[..., None, r:], cos, sin)  # (B, T, 1, E): shared by all heads
        kv = Linear(H * (dn + dv), ("kv_lora", "q_heads"), name="wkv_b", **lin)(c)
        kv = kv.reshape(B, T, H, dn + dv)
        k = jnp.concatenate((kv[..., :dn], jnp.broadcast_to(k_pe, (B, T, H, dr))), axis=-1)
        v = kv[..., dn:]  # (B, T, H, V)
        y = attention(q, k, v, scale=dqk ** -0.5, impl=self.attention_impl, **_dropout(self, cfg))
        y = Linear(C, ("q_heads", "embed"), name="wo", **lin)(y.reshape(B, T, H * dv))
        return nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)


def _project(module: nn.Module, x, specs) -> list[jax.Array]:
    """The projections ``(name, features, logical axes)`` of x, as one fused GEMM when the module's
    ``fuse_projections`` is set (layers.fused_projections), else one Linear each; the parameters
    are the same either way."""
    cfg = module.cfg
    init = dict(use_bias=cfg.bias, init_std=cfg.init_std)
    if module.fuse_projections:
        params = [LinearParams(n, axes, name=name, **init)(x.shape[-1]) for name, n, axes in specs]
        return fused_projections(x, params, module.dtype, module.dot_general)
    return [Linear(n, axes, name=name, dtype=module.dtype, dot_general=module.dot_general,
                   **init)(x) for name, n, axes in specs]


def _dropout(module: nn.Module, cfg: ModelConfig) -> dict:
    if module.deterministic or cfg.dropout == 0.0:
        return {}
    return {"dropout_rate": cfg.dropout, "dropout_rng": module.make_rng("dropout")}
