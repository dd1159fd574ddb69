"""KV caches and the cached forward of SWA-MLA in JAX (SPEC.md 3.1, 3.2).

Shapes: B batch, T chunk time, S key slots, C model width, H query heads, K kv heads,
G = H / K, D head dim, W window, Z sink slots, R kv latent rank, N nope dim, E rope dim,
V value dim (and vocabulary in logits).

Per layer the cache holds (``init_cache``):

- SWA: a ring of the last ``swa_window`` keys/values (slot ``p % W`` holds position p) and a sink
  buffer of the first ``swa_sink_size``: ``(W + Z) * 2 * K * D`` numbers whatever the length.
- MLA: only the normed latent ``c`` and the rotated shared ``k_pe`` per position (``R + E``
  numbers per token); attention runs in the absorbed form, ``W_uk`` folded into the query and
  ``W_uv`` applied after the weighted sum of latents.

One function, :func:`forward_chunk`, runs T new tokens per row at per-row positions
``start_b .. start_b + T - 1`` against the cache: chunked prefill uses it with T = chunk, decode
with T = 1. It reads the model's own parameter tree (``cycles/block_j`` stacked over cycle
repeats, then ``h_i``) and its own Linear/norm/MLP modules, layer by layer (unrolled, so every
layer's cache is its own buffer and a new token is written into it in place).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from swamla.config import BlockKind, ModelConfig
from swamla_jax.layers import (Embed, Linear, SwiGLU, apply_rope, block_norm, f32, latent_norm,
                               logit_scale, rope_tables)

NO_POSITION = -1  # an empty ring slot


# ------------------------------------------------------------------------------- the cache
def _layer_cache(cfg: ModelConfig, kind: BlockKind, batch: int, cache_len: int, dtype):
    z = lambda *shape: jnp.zeros((batch,) + shape, dtype)  # noqa: E731
    if kind is BlockKind.SWA:
        K, D = cfg.n_head_kv, cfg.head_dim
        return {"k": z(cfg.swa_window, K, D), "v": z(cfg.swa_window, K, D),
                "sink_k": z(cfg.swa_sink_size, K, D), "sink_v": z(cfg.swa_sink_size, K, D)}
    return {"c": z(cache_len, cfg.kv_lora_rank), "k_pe": z(cache_len, cfg.qk_rope_head_dim)}


def init_cache(cfg: ModelConfig, batch: int, cache_len: int, dtype=f32) -> dict:
    """An empty cache: one buffer set per layer (``h_{i}``), never stacked.

    Separate buffers let the decode loop write each new token into its layer's cache in place;
    a stacked cache scanned over layers would be rewritten whole at every token.
    ``swa_pos`` (B, W) is the position each ring slot holds (shared by all SWA layers).
    """
    layers = {f"h_{i}": _layer_cache(cfg, kind, batch, cache_len, dtype)
              for i, kind in enumerate(cfg.block_kinds)}
    return {"layers": layers,
            "swa_pos": jnp.full((batch, cfg.swa_window), NO_POSITION, jnp.int32)}


def cache_nbytes(cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache["layers"]))


# ------------------------------------------------------------------------------- per-chunk plan
def _chunk_plan(cfg: ModelConfig, cache, pos, start, end, S: int) -> dict:
    """Everything the layers share for one chunk: RoPE of the current positions only, the masks,
    and which chunk tokens move into the ring and sink buffers."""
    B, T = pos.shape
    W, Z = cfg.swa_window, cfg.swa_sink_size
    flat = pos.reshape(-1)
    ropes = {kind: tuple(t.reshape(B, T, -1) for t in rope_tables(dim, flat, cfg.rope_theta,
                                                                    cfg.rope_factor))
             for kind, dim in ((BlockKind.SWA, cfg.head_dim),
                               (BlockKind.MLA, cfg.qk_rope_head_dim))}
    i = pos[:, :, None]  # (B, T, 1) query positions
    # SWA keys are [sink (Z) | ring (W) | chunk (T)]; each key position is seen once (SPEC 3.1):
    # a sink slot only once it has left the window, a ring slot only inside it.
    sink_pos = jnp.broadcast_to(jnp.arange(Z), (B, Z))[:, None, :]
    ring_pos = cache["swa_pos"][:, None, :]
    chunk_pos = pos[:, None, :]
    swa_mask = jnp.concatenate([
        (sink_pos < start[:, None, None]) & (i - sink_pos >= W),
        (ring_pos >= 0) & (i - ring_pos < W),
        (chunk_pos <= i) & ((i - chunk_pos < W) | (chunk_pos < Z)),
    ], axis=-1)  # (B, T, Z + W + T)
    mla_mask = jnp.arange(S)[None, None, :] <= i  # (B, T, S): slots up to i are written
    # Ring slot s takes the last real chunk position p == s (mod W), if the chunk has one.
    last = jnp.minimum(end, start + T) - 1  # (B,)
    p = last[:, None] - jnp.mod(last[:, None] - jnp.arange(W), W)  # (B, W)
    ring_take = (p >= start[:, None]) & (p >= 0)
    s = jnp.arange(Z)[None, :]
    sink_take = (s >= start[:, None]) & (s < start[:, None] + T) & (s < end[:, None])
    return {"pos": pos, "ropes": ropes, "swa_mask": swa_mask, "mla_mask": mla_mask,
            "ring_take": ring_take, "ring_idx": jnp.clip(p - start[:, None], 0, T - 1),
            "sink_take": sink_take, "sink_idx": jnp.clip(s - start[:, None], 0, T - 1),
            "swa_pos": jnp.where(ring_take, p, cache["swa_pos"])}


def _rope(x, cos, sin):
    """RoPE at per-row positions: x (B, T, H, D), cos/sin (B, T, P)."""
    B, T = x.shape[:2]
    flat = lambda a: a.reshape(B * T, *a.shape[2:])  # noqa: E731
    return apply_rope(x.reshape(1, B * T, *x.shape[2:]), flat(cos), flat(sin)).reshape(x.shape)


def _move(old, new, take, idx):
    """Buffer rows ``old`` (B, W, ...) replaced by chunk rows ``new[b, idx]`` where ``take``."""
    picked = jnp.take_along_axis(new, idx.reshape(idx.shape + (1,) * (new.ndim - 2)), axis=1)
    return jnp.where(take.reshape(take.shape + (1,) * (new.ndim - 2)), picked, old)


def _masked_attention(q, k, v, mask, scale):
    """q (B,T,H,D), k (B,S,K,D), v (B,S,K,V), mask (B,T,S); float32 scores and softmax."""
    B, T, H, D = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, D)  # head h reads kv head h // G
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k, preferred_element_type=f32) * scale
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("BKGTS,BSKV->BTKGV", probs.astype(v.dtype), v)
    return out.reshape(B, T, H, v.shape[-1])


# ------------------------------------------------------------------------------- layers
def _linear(cfg, p, x, dtype):
    return Linear(p["kernel"].shape[1], ("in", "out"), use_bias=cfg.bias,
                  dtype=dtype).apply({"params": p}, x)


def swa_attention(cfg: ModelConfig, p, cache, x, plan, dtype):
    """SWA over [sink | ring | chunk] (SPEC 3.1); returns (y (B,T,C), updated layer cache)."""
    B, T, C = x.shape
    H, K, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    q = _linear(cfg, p["q_proj"], x, dtype).reshape(B, T, H, D)
    k = _linear(cfg, p["k_proj"], x, dtype).reshape(B, T, K, D)
    v = _linear(cfg, p["v_proj"], x, dtype).reshape(B, T, K, D)
    cos, sin = plan["ropes"][BlockKind.SWA]
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if cfg.logit_scale_base is not None:  # inference always applies it (SPEC 3.1)
        q = (q.astype(f32) * logit_scale(cfg, plan["pos"])[..., None, None]).astype(q.dtype)
    k_all = jnp.concatenate([cache["sink_k"], cache["k"], k.astype(cache["k"].dtype)], axis=1)
    v_all = jnp.concatenate([cache["sink_v"], cache["v"], v.astype(cache["v"].dtype)], axis=1)
    y = _masked_attention(q, k_all.astype(dtype), v_all.astype(dtype), plan["swa_mask"], D ** -0.5)
    y = _linear(cfg, p["o_proj"], y.reshape(B, T, H * D), dtype)
    k, v = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
    new = {"k": _move(cache["k"], k, plan["ring_take"], plan["ring_idx"]),
           "v": _move(cache["v"], v, plan["ring_take"], plan["ring_idx"]),
           "sink_k": _move(cache["sink_k"], k, plan["sink_take"], plan["sink_idx"]),
           "sink_v": _move(cache["sink_v"], v, plan["sink_take"], plan["sink_idx"])}
    return y, new


def mla_attention(cfg: ModelConfig, p, cache, x, plan, dtype):
    """Absorbed MLA over the latent cache (SPEC 3.2); returns (y (B,T,C), updated layer cache).

    With ``W_uk``/``W_uv`` the k/v parts of ``wkv_b``: ``q_nope . (c W_uk) = (q_nope W_uk^T) . c``
    and ``sum_j p_j (c_j W_uv) = (sum_j p_j c_j) W_uv``, so keys and values are never expanded.
    """
    B, T, C = x.shape
    H, dn, dv, r, dr = (cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank,
                        cfg.qk_rope_head_dim)
    if cfg.q_lora_rank:
        q = _linear(cfg, p["wq_a"], x, dtype)
        q = latent_norm(cfg, dtype, None).apply({"params": p["q_norm"]}, q)
        q = _linear(cfg, p["wq_b"], q, dtype)
    else:
        q = _linear(cfg, p["wq"], x, dtype)
    q = q.reshape(B, T, H, dn + dr)
    cos, sin = plan["ropes"][BlockKind.MLA]
    q_nope, q_pe = q[..., :dn], _rope(q[..., dn:], cos, sin)
    latent = _linear(cfg, p["wkv_a"], x, dtype)  # (B, T, R+E)
    c = latent_norm(cfg, dtype, None).apply({"params": p["kv_norm"]}, latent[..., :r])
    k_pe = _rope(latent[..., None, r:], cos, sin)[:, :, 0]  # (B, T, E)
    rows = jnp.arange(B)[:, None]
    c_all = cache["c"].at[rows, plan["pos"]].set(c.astype(cache["c"].dtype), mode="drop")
    kpe_all = cache["k_pe"].at[rows, plan["pos"]].set(k_pe.astype(cache["k_pe"].dtype), mode="drop")

    w = p["wkv_b"]["kernel"].reshape(r, H, dn + dv).astype(dtype)
    w_uk, w_uv = w[..., :dn], w[..., dn:]  # (R, H, N), (R, H, V)
    q_c = jnp.einsum("BTHN,RHN->BTHR", q_nope, w_uk)
    scores = (jnp.einsum("BTHR,BSR->BHTS", q_c, c_all.astype(dtype), preferred_element_type=f32)
              + jnp.einsum("BTHE,BSE->BHTS", q_pe, kpe_all.astype(dtype),
                           preferred_element_type=f32))
    if cfg.bias:  # q_nope . b_k: one shift per query and head (softmax-invariant; kept, exact)
        b = p["wkv_b"]["bias"].reshape(H, dn + dv).astype(dtype)
        scores = scores + jnp.einsum("BTHN,HN->BHT", q_nope, b[:, :dn],
                                     preferred_element_type=f32)[..., None]
    scores = jnp.where(plan["mla_mask"][:, None], scores * (dn + dr) ** -0.5, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    o_latent = jnp.einsum("BHTS,BSR->BTHR", probs.astype(dtype), c_all.astype(dtype))
    o = jnp.einsum("BTHR,RHV->BTHV", o_latent, w_uv)
    if cfg.bias:  # the weights sum to one, so the v bias passes through unchanged
        o = o + b[:, dn:]
    y = _linear(cfg, p["wo"], o.reshape(B, T, H * dv), dtype)
    return y, {"c": c_all, "k_pe": kpe_all}


def _block(cfg: ModelConfig, kind: BlockKind, p, cache, x, plan, dtype):
    if kind is BlockKind.SWA:
        (n1, n2, mlp), attn = ("norm1", "norm2", "mlp"), swa_attention
    else:
        (n1, n2, mlp), attn = ("attn_norm", "ffn_norm", "ffn"), mla_attention
    norm = block_norm(cfg, dtype, None)
    y, cache = attn(cfg, p["attn"], cache, norm.apply({"params": p[n1]}, x), plan, dtype)
    x = x + y
    x = x + SwiGLU(cfg, dtype).apply({"params": p[mlp]}, norm.apply({"params": p[n2]}, x))
    return x, cache


def forward_chunk(cfg: ModelConfig, params, cache, tokens, start, end, dtype=f32):
    """Run ``tokens`` (B, T) at positions ``start_b + t`` through the cached model.

    Tokens at positions ``>= end_b`` are padding: they are neither stored in the SWA buffers nor
    seen by real queries (MLA slots they touch are overwritten before any real query reads them).
    Returns (final-normed hidden states (B, T, C), updated cache); see :func:`logits`.
    """
    B, T = tokens.shape
    layers = cache["layers"]
    S = next((c["c"].shape[-2] for c in _mla_caches(cfg, layers)), 1)
    pos = start[:, None] + jnp.arange(T, dtype=start.dtype)[None, :]
    plan = _chunk_plan(cfg, cache, pos, start, end, S)
    x = Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype).apply({"params": params["wte"]}, tokens)
    new = {}
    for i, kind in enumerate(cfg.block_kinds):  # unrolled: each layer updates its own buffers
        x, new[f"h_{i}"] = _block(cfg, kind, layer_params(cfg, params, i), layers[f"h_{i}"], x,
                                  plan, dtype)
    x = block_norm(cfg, dtype, None).apply({"params": params["ln_f"]}, x)
    return x, {"layers": new, "swa_pos": plan["swa_pos"]}


def layer_params(cfg: ModelConfig, params, i: int):
    """Layer i's parameters: row ``i // L`` of the stacked ``cycles/block_{i % L}``, or ``h_i``."""
    L = len(cfg.cycle)
    if i < cfg.n_cycles * L:
        return jax.tree_util.tree_map(lambda a: a[i // L], params["cycles"][f"block_{i % L}"])
    return params[f"h_{i}"]


def _mla_caches(cfg, layers):
    return [layers[f"h_{i}"] for i, kind in enumerate(cfg.block_kinds) if kind is BlockKind.MLA]


def logits(cfg: ModelConfig, params, x, dtype=f32):
    """Tied-head logits (float32) of final hidden states x (..., C)."""
    embed = Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype)
    squeeze = x.ndim == 2
    out = embed.apply({"params": params["wte"]}, x[:, None] if squeeze else x, method="attend")
    return out[:, 0] if squeeze else out
