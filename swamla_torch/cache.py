"""KV caches and the cached forward of SWA-MLA in PyTorch (SPEC.md 3.1, 3.2).

Mirrors ``swamla_jax/cache.py``. Shapes: B batch, T chunk time, S key slots, C model width,
H query heads, K kv heads, D head dim, W window, Z sink slots, R kv latent rank, N nope dim,
E rope dim, V value dim.

Per layer the cache holds (``init_cache``):

- SWA: a ring of the last ``swa_window`` keys/values (slot ``p % W`` holds position p) and a sink
  buffer of the first ``swa_sink_size``: ``(W + Z) * 2 * K * D`` numbers whatever the length.
- MLA: only the normed latent ``c`` and the rotated shared ``k_pe`` per position (``R + E``
  numbers per token); attention runs in the absorbed form.

:func:`forward_chunk` runs T new tokens per row at positions ``start_b .. start_b + T - 1``,
reading the model's own modules (its Linear layers, norms and MLPs) and updating the cache tensors
in place, so their shapes and addresses stay fixed (what CUDA graphs need).
"""

from __future__ import annotations

import torch

from swamla.config import BlockKind, ModelConfig
from swamla_torch.layers import apply_rope, logit_scale, rope_tables

NO_POSITION = -1  # an empty ring slot


def init_cache(cfg: ModelConfig, batch: int, cache_len: int, dtype=torch.float32,
               device="cpu") -> dict:
    """An empty cache: one dict per layer, and ``swa_pos`` (B, W), the position each ring slot
    holds."""
    z = lambda *shape: torch.zeros((batch,) + shape, dtype=dtype, device=device)  # noqa: E731
    layers = []
    for kind in cfg.block_kinds:
        if kind is BlockKind.SWA:
            K, D, W, Z = cfg.n_head_kv, cfg.head_dim, cfg.swa_window, cfg.swa_sink_size
            layers.append({"k": z(W, K, D), "v": z(W, K, D), "sink_k": z(Z, K, D),
                           "sink_v": z(Z, K, D)})
        else:
            layers.append({"c": z(cache_len, cfg.kv_lora_rank),
                           "k_pe": z(cache_len, cfg.qk_rope_head_dim)})
    swa_pos = torch.full((batch, cfg.swa_window), NO_POSITION, dtype=torch.long, device=device)
    return {"layers": layers, "swa_pos": swa_pos}


def cache_nbytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache["layers"] for t in layer.values())


def cache_tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache["layers"] for t in layer.values()] + [cache["swa_pos"]]


def _chunk_plan(cfg: ModelConfig, cache, pos, start, end, S: int) -> dict:
    """RoPE of the current positions only, the masks, and which chunk tokens enter the ring and
    sink buffers (see the JAX twin for the reasoning)."""
    B, T = pos.shape
    W, Z, dev = cfg.swa_window, cfg.swa_sink_size, pos.device
    flat = pos.reshape(-1)
    ropes = {kind: rope_tables(dim, flat, cfg.rope_theta, cfg.rope_factor)  # each (B*T, P)
             for kind, dim in ((BlockKind.SWA, cfg.head_dim),
                               (BlockKind.MLA, cfg.qk_rope_head_dim))}
    i = pos[:, :, None]  # (B, T, 1)
    sink_pos = torch.arange(Z, device=dev).expand(B, Z)[:, None, :]
    ring_pos = cache["swa_pos"][:, None, :]
    chunk_pos = pos[:, None, :]
    swa_mask = torch.cat([
        (sink_pos < start[:, None, None]) & (i - sink_pos >= W),   # sink: once out of the window
        (ring_pos >= 0) & (i - ring_pos < W),                      # ring: inside the window
        (chunk_pos <= i) & ((i - chunk_pos < W) | (chunk_pos < Z)),
    ], dim=-1)  # (B, T, Z + W + T)
    mla_mask = torch.arange(S, device=dev)[None, None, :] <= i  # (B, T, S)
    last = torch.minimum(end, start + T) - 1
    p = last[:, None] - torch.remainder(last[:, None] - torch.arange(W, device=dev), W)  # (B, W)
    ring_take = (p >= start[:, None]) & (p >= 0)
    s = torch.arange(Z, device=dev)[None, :]
    sink_take = (s >= start[:, None]) & (s < start[:, None] + T) & (s < end[:, None])
    return {"pos": pos, "ropes": ropes, "swa_mask": swa_mask, "mla_mask": mla_mask,
            "ring_take": ring_take, "ring_idx": (p - start[:, None]).clamp(0, T - 1),
            "sink_take": sink_take, "sink_idx": (s - start[:, None]).clamp(0, T - 1),
            "swa_pos": torch.where(ring_take, p, cache["swa_pos"])}


def _rope(x, cos, sin):
    """RoPE at per-row positions: x (B, T, H, D), cos/sin (B*T, P)."""
    B, T = x.shape[:2]
    return apply_rope(x.reshape(1, B * T, *x.shape[2:]), cos, sin).reshape(x.shape)


def _move_(buf, new, take, idx):
    """In place: buffer rows ``buf`` (B, W, ...) <- chunk rows ``new[b, idx]`` where ``take``."""
    tail = (1,) * (new.dim() - 2)
    picked = new.gather(1, idx.reshape(idx.shape + tail).expand(idx.shape + new.shape[2:]))
    buf.copy_(torch.where(take.reshape(take.shape + tail), picked.to(buf.dtype), buf))


def _masked_attention(q, k, v, mask, scale):
    """q (B,T,H,D), k (B,S,K,D), v (B,S,K,V), mask (B,T,S); float32 scores and softmax."""
    G = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)  # (B, H, T, D)
    kh = k.repeat_interleave(G, dim=2).transpose(1, 2)  # (B, H, S, D): head h reads kv head h // G
    vh = v.repeat_interleave(G, dim=2).transpose(1, 2)
    scores = torch.matmul(qh.float(), kh.float().transpose(-1, -2)) * scale  # (B, H, T, S)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(vh.dtype), vh).transpose(1, 2)  # (B, T, H, V)


def swa_attention(cfg: ModelConfig, attn, cache, x, plan):
    """SWA over [sink | ring | chunk] (SPEC 3.1) with ``attn`` an ``SWAttention``."""
    B, T, _ = x.shape
    H, K, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    q = attn.q_proj(x).view(B, T, H, D)
    k = attn.k_proj(x).view(B, T, K, D)
    v = attn.v_proj(x).view(B, T, K, D)
    cos, sin = plan["ropes"][BlockKind.SWA]
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if cfg.logit_scale_base is not None:  # inference always applies it (SPEC 3.1)
        q = (q.float() * logit_scale(cfg, plan["pos"])[..., None, None]).to(q.dtype)
    k_all = torch.cat([cache["sink_k"], cache["k"], k.to(cache["k"].dtype)], dim=1).to(q.dtype)
    v_all = torch.cat([cache["sink_v"], cache["v"], v.to(cache["v"].dtype)], dim=1).to(q.dtype)
    y = _masked_attention(q, k_all, v_all, plan["swa_mask"], D ** -0.5)
    for name, new in (("k", k), ("v", v)):
        _move_(cache[name], new, plan["ring_take"], plan["ring_idx"])
        _move_(cache[f"sink_{name}"], new, plan["sink_take"], plan["sink_idx"])
    return attn.o_proj(y.reshape(B, T, H * D))


def mla_attention(cfg: ModelConfig, attn, cache, x, plan):
    """Absorbed MLA over the latent cache (SPEC 3.2) with ``attn`` an ``MLAttention``.

    ``q_nope . (c W_uk) = (q_nope W_uk^T) . c`` and ``sum_j p_j (c_j W_uv) = (sum_j p_j c_j) W_uv``.
    """
    B, T, _ = x.shape
    H, dn, dv, r, dr = (cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank,
                        cfg.qk_rope_head_dim)
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))) if cfg.q_lora_rank else attn.wq(x)
    q = q.view(B, T, H, dn + dr)
    cos, sin = plan["ropes"][BlockKind.MLA]
    q_nope, q_pe = q[..., :dn], _rope(q[..., dn:], cos, sin)
    latent = attn.wkv_a(x)  # (B, T, R+E)
    c = attn.kv_norm(latent[..., :r])
    k_pe = _rope(latent[..., None, r:], cos, sin)[:, :, 0]  # (B, T, E)
    rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
    cache["c"].index_put_((rows, plan["pos"]), c.to(cache["c"].dtype))
    cache["k_pe"].index_put_((rows, plan["pos"]), k_pe.to(cache["k_pe"].dtype))
    c_all, kpe_all = cache["c"].to(q.dtype), cache["k_pe"].to(q.dtype)  # (B, S, R), (B, S, E)

    w = attn.wkv_b.weight.view(H, dn + dv, r).to(q.dtype)
    w_uk, w_uv = w[:, :dn], w[:, dn:]  # (H, N, R), (H, V, R)
    q_c = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
    # Products in the compute dtype, then float32 (as DeepSeek's reference inference does):
    # casting the whole latent cache to float32 every step would multiply its memory traffic.
    scores = (torch.einsum("bthr,bsr->bhts", q_c, c_all).float()
              + torch.einsum("bthe,bse->bhts", q_pe.to(c_all.dtype), kpe_all).float())
    bias = attn.wkv_b.bias
    if bias is not None:  # q_nope . b_k: one shift per query and head (kept for exactness)
        b = bias.view(H, dn + dv).to(q.dtype)
        scores = scores + torch.einsum("bthn,hn->bht", q_nope.float(), b[:, :dn].float())[..., None]
    scores = (scores * (dn + dr) ** -0.5).masked_fill(~plan["mla_mask"][:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o_latent = torch.einsum("bhts,bsr->bthr", probs.to(q.dtype), c_all)
    o = torch.einsum("bthr,hvr->bthv", o_latent, w_uv)
    if bias is not None:  # the weights sum to one, so the v bias passes through unchanged
        o = o + b[:, dn:]
    return attn.wo(o.reshape(B, T, H * dv))


def forward_chunk(model, cache, tokens, start, end):
    """Run ``tokens`` (B, T) at positions ``start_b + t``; tokens at positions ``>= end_b`` are
    padding. Updates ``cache`` in place; returns the final-normed hidden states (B, T, C)."""
    cfg: ModelConfig = model.config
    B, T = tokens.shape
    S = next((c["c"].shape[1] for c in cache["layers"] if "c" in c), 1)
    pos = start[:, None] + torch.arange(T, device=tokens.device)[None, :]
    plan = _chunk_plan(cfg, cache, pos, start, end, S)
    tr = model.transformer
    x = tr.wte(tokens)
    for block, kind, layer in zip(tr.h, cfg.block_kinds, cache["layers"]):
        if kind is BlockKind.SWA:
            x = x + swa_attention(cfg, block.attn, layer, block.norm1(x), plan)
            x = x + block.mlp(block.norm2(x))
        else:
            x = x + mla_attention(cfg, block.attn, layer, block.attn_norm(x), plan)
            x = x + block.ffn(block.ffn_norm(x))
    cache["swa_pos"].copy_(plan["swa_pos"])
    return tr.ln_f(x)


def logits(model, x):
    """Tied-head logits (float32) of final hidden states x (..., C)."""
    return (x @ model.transformer.wte.weight.to(x.dtype).T).float()
