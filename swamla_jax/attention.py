"""SWA and MLA attention of SWA-MLA in Flax (SPEC.md section 3), training and cached forms.

Shapes: B batch, T query time, S key time, C model width, H query heads, K kv heads,
G = H / K heads per kv group, D head dim, P = D/2 rotation pairs, R kv latent rank,
N nope dim, E rope dim, V value dim, W window, Z sink slots.

Each module has one ``__call__``: without ``cache`` it attends over the whole sequence (training,
evaluation) and returns y; with this layer's ``cache`` buffers (``swamla_jax.cache``) it runs a
chunk of new tokens against them and returns (y, the updated buffers). Which kernel runs is
decided in :func:`attention` alone, from the compute plan; the modules only describe the mask.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from swamla.config import ModelConfig
from swamla.plan import ComputePlan, REFERENCE_PLAN
from swamla_jax.cache import swa_keys, write_latent, write_swa
from swamla_jax.kernels.attention import causal_attention, swa_sink_attention
from swamla_jax.kernels.documents import causal_document_attention, swa_document_attention
from swamla_jax.kernels.projections import LinearParams, fused_projections, linear
from swamla_jax.layers import Linear, apply_rope, f32, latent_norm, logit_scale


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


def document_mask(segment_ids: jax.Array, positions: jax.Array, window: int | None,
                  sink: int) -> jax.Array:
    """(B, T, T) bool, SPEC 3.3: query i sees key j iff both are in one document, j <= i and
    (without a window) always, (with one) ``i - j < window`` or ``positions[j] < sink``, the
    positions counted from each document's start."""
    T = segment_ids.shape[1]
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (j <= i)
    if window is not None:
        mask &= (i - j < window) | (positions[:, None, :] < sink)
    return mask


def attention(q, k, v, *, scale: float, window: int | None = None, sink: int = 0,
              mask: jax.Array | None = None, documents=None, dropout_rate: float = 0.0,
              dropout_rng=None, impl: str = "reference") -> jax.Array:
    """Causal (optionally windowed + sink) attention; q (B, T, H, D), k (B, S, K, D),
    v (B, S, K, V) -> (B, T, H, V).

    ``impl="reference"``: explicit float32 scores and softmax, exact to the SPEC on any backend.
    ``mask`` (B, T, S) then replaces the causal one: the cached path, whose keys are not in
    time order. ``documents`` = (segment_ids, positions), each (B, T): a packed row whose
    documents attend only within themselves (SPEC 3.3). ``impl="cudnn"``: flash attention that
    skips what lies outside the window (``kernels.attention``), or with ``documents`` the
    kernels of ``kernels.documents``.
    """
    if impl == "cudnn":
        if documents is not None:
            if window is None:
                return causal_document_attention(q, k, v, documents[0], scale=scale)
            return swa_document_attention(q, k, v, *documents, scale=scale, window=window,
                                          sink=sink)
        if window is None:
            return causal_attention(q, k, v, scale=scale)
        return swa_sink_attention(q, k, v, scale=scale, window=window, sink=sink)
    if documents is not None:
        mask = document_mask(*documents, window, sink)
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    qg = q.reshape(B, T, K, H // K, D)  # head h reads kv head h // G
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k, preferred_element_type=f32) * scale
    mask = visible_mask(T, S, window, sink) if mask is None else mask[:, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("BKGTS,BSKV->BTKGV", probs.astype(v.dtype), v)
    return out.reshape(B, T, H, v.shape[-1])


class SWAttention(nn.Module):
    """Sliding-window attention with an attention sink, RoPE and grouped-query heads (SPEC 3.1).

    The cache holds a ring of the last W keys/values and the first Z (the sink).
    """

    cfg: ModelConfig
    plan: ComputePlan = REFERENCE_PLAN
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, rope, positions, cache=None, chunk=None, segment_ids=None):
        """x (B, T, C) -> y (B, T, C).

        Whole sequences: ``positions`` (T,), ``rope`` cos/sin (T, P); with ``segment_ids``
        (B, T), a packed row of documents (SPEC 3.3), ``positions`` and ``rope`` then per row,
        counted from each document's start. A cached chunk: ``cache`` this layer's buffers,
        ``chunk`` from ``cache.chunk_layout``, ``positions`` (B, T) per row, ``rope``
        (B, T, P); returns (y, the buffers with the chunk's keys and values in).
        """
        cfg, plan = self.cfg, self.plan
        B, T, C = x.shape
        H, K, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        q, k, v = _project(self, x, (("q_proj", H * D, ("embed", "q_heads")),
                                     ("k_proj", K * D, ("embed", "kv_heads")),
                                     ("v_proj", K * D, ("embed", "kv_heads"))))
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, K, D), v.reshape(B, T, K, D)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # SPEC 3.1: inference always scales; training only if the config asks.
        if cfg.logit_scale_base is not None and (cache is not None or self.deterministic
                                                 or cfg.apply_logit_scale_during_training):
            q = (q.astype(f32) * logit_scale(cfg, positions)[..., None, None]).astype(q.dtype)
        if cache is None:
            y = attention(q, k, v, scale=D ** -0.5, window=cfg.swa_window, sink=cfg.swa_sink_size,
                          documents=_documents(segment_ids, positions), impl=plan.attention_impl,
                          **_dropout(self))
        else:  # the reference path: the flash kernels take no per-row mask
            k_all, v_all = swa_keys(cache, k, v, q.dtype)  # (B, Z + W + T, K, D)
            y = attention(q, k_all, v_all, scale=D ** -0.5, mask=chunk["swa_mask"])
            cache = write_swa(cache, k, v, chunk)
        y = Linear(cfg, C, ("q_heads", "embed"), plan, name="o_proj")(y.reshape(B, T, H * D))
        y = nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
        return y if cache is None else (y, cache)


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (SPEC 3.2): the expanded form over whole
    sequences, the absorbed form over a cache of latents, as DeepSeek-V3's inference MLA."""

    cfg: ModelConfig
    plan: ComputePlan = REFERENCE_PLAN
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, rope, positions, cache=None, chunk=None, segment_ids=None):
        """x (B, T, C) -> y (B, T, C); arguments as ``SWAttention.__call__``. With a cache, only
        the chunk's latents c and rope keys k_pe are stored, at slots ``positions``."""
        cfg, plan = self.cfg, self.plan
        B, T, C = x.shape
        H, dn, dv, r = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        dqk, dr = cfg.mla_qk_head_dim, cfg.qk_rope_head_dim
        # The query projection (or its low-rank first half) and the kv down-projection both
        # read x: one GEMM when fused.
        latent_spec = ("wkv_a", r + dr, ("embed", "kv_lora"))
        if cfg.q_lora_rank:
            q, latent = _project(self, x, (("wq_a", cfg.q_lora_rank, ("embed", "q_lora")),
                                           latent_spec))
            q = latent_norm(cfg, plan, "q_norm")(q)
            q = Linear(cfg, H * dqk, ("q_lora", "q_heads"), plan, name="wq_b")(q)
        else:
            q, latent = _project(self, x, (("wq", H * dqk, ("embed", "q_heads")), latent_spec))
        q = q.reshape(B, T, H, dqk)  # latent: (B, T, R+E)
        cos, sin = rope
        # (B, T, H, N+E): the nope part, then the rotated rope part
        q = jnp.concatenate((q[..., :dn], apply_rope(q[..., dn:], cos, sin)), axis=-1)
        c = latent_norm(cfg, plan, "kv_norm")(latent[..., :r])  # (B, T, R)
        k_pe = apply_rope(latent[..., None, r:], cos, sin)  # (B, T, 1, E): one key for all heads
        wkv_b = LinearParams(cfg, H * (dn + dv), ("kv_lora", "q_heads"), name="wkv_b")(r)
        if cache is None:
            y = self._expanded(q, c, k_pe, wkv_b, _documents(segment_ids, positions))
        else:
            cache = write_latent(cache, c, k_pe[:, :, 0], positions)
            y = self._absorbed(q, cache, chunk["mla_mask"], wkv_b)
        y = Linear(cfg, C, ("q_heads", "embed"), plan, name="wo")(y.reshape(B, T, H * dv))
        y = nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
        return y if cache is None else (y, cache)

    def _expanded(self, q, c, k_pe, wkv_b, documents):
        """SPEC 3.2 as written: per-head keys and values from the latents; (B, T, H, V)."""
        cfg = self.cfg
        B, T, H = q.shape[:3]
        dn = cfg.qk_nope_head_dim
        kv = linear(c, *wkv_b, self.plan).reshape(B, T, H, dn + cfg.v_head_dim)
        k = jnp.concatenate((kv[..., :dn], jnp.broadcast_to(k_pe, (B, T, H, k_pe.shape[-1]))),
                            axis=-1)  # (B, T, H, N+E)
        v = kv[..., dn:]  # (B, T, H, V)
        return attention(q, k, v, scale=cfg.mla_qk_head_dim ** -0.5, documents=documents,
                         impl=self.plan.attention_impl, **_dropout(self))

    def _absorbed(self, q, cache, mask, wkv_b):
        """Attention over the S cached latents, W_kv_b folded into the query and the output:
        ``q_nope . (c W_uk) = (q_nope W_uk^T) . c`` and
        ``sum_j p_j (c_j W_uv) = (sum_j p_j c_j) W_uv``; mask (B, T, S); returns (B, T, H, V)."""
        cfg = self.cfg
        H, dn, dv, r = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q_nope, q_pe = q[..., :dn], q[..., dn:]  # (B, T, H, N), (B, T, H, E)
        dtype = q.dtype
        kernel, bias = wkv_b
        c_all = cache["c"].astype(dtype)  # (B, S, R)
        kpe_all = cache["k_pe"].astype(dtype)  # (B, S, E)
        w = kernel.reshape(r, H, dn + dv).astype(dtype)
        w_uk, w_uv = w[..., :dn], w[..., dn:]  # (R, H, N), (R, H, V)
        q_c = jnp.einsum("BTHN,RHN->BTHR", q_nope, w_uk)
        scores = (jnp.einsum("BTHR,BSR->BHTS", q_c, c_all, preferred_element_type=f32)
                  + jnp.einsum("BTHE,BSE->BHTS", q_pe, kpe_all, preferred_element_type=f32))
        if bias is not None:  # q_nope . b_k: one shift per query and head (kept for exactness)
            b = bias.reshape(H, dn + dv).astype(dtype)
            scores = scores + jnp.einsum("BTHN,HN->BHT", q_nope, b[:, :dn],
                                         preferred_element_type=f32)[..., None]
        scores = jnp.where(mask[:, None], scores * cfg.mla_qk_head_dim ** -0.5, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        o_latent = jnp.einsum("BHTS,BSR->BTHR", probs.astype(dtype), c_all)
        o = jnp.einsum("BTHR,RHV->BTHV", o_latent, w_uv)
        if bias is not None:  # the weights sum to one, so the v bias passes through unchanged
            o = o + b[:, dn:]
        return o


def _project(module: nn.Module, x, specs) -> list[jax.Array]:
    """The projections ``(name, features, logical axes)`` of x, as one fused GEMM when the plan
    says ``fuse_projections`` (``kernels.projections``), else one Linear each; the parameters are
    the same either way."""
    cfg, plan = module.cfg, module.plan
    if plan.fuse_projections:
        params = [LinearParams(cfg, n, axes, name=name)(x.shape[-1]) for name, n, axes in specs]
        return fused_projections(x, params, plan)
    return [Linear(cfg, n, axes, plan, name=name)(x) for name, n, axes in specs]


def _documents(segment_ids, positions):
    return None if segment_ids is None else (segment_ids, positions)


def _dropout(module: nn.Module) -> dict:
    if module.deterministic or module.cfg.dropout == 0.0:
        return {}
    return {"dropout_rate": module.cfg.dropout, "dropout_rng": module.make_rng("dropout")}
