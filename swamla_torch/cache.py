"""The KV cache of SWA-MLA in PyTorch (SPEC.md 3.1, 3.2): its buffers and per-chunk bookkeeping.

Mirrors ``swamla_jax/cache.py``. Shapes: B batch, T chunk time, S latent slots (the cache
length), K kv heads, D head dim, W window, Z sink slots, R kv latent rank, E rope dim.

Per layer the cache holds (``init_cache``):

- SWA: a ring of the last ``swa_window`` keys/values (slot ``p % W`` holds position p) and a sink
  buffer of the first ``swa_sink_size``: ``(W + Z) * 2 * K * D`` numbers whatever the length.
- MLA: only the normed latent ``c`` and the rotated shared ``k_pe`` per position (``R + E``
  numbers per token); attention runs in the absorbed form.

The attention modules read and write it (their ``cache`` argument); ``SWAMLA.forward_chunk``
runs a chunk of tokens through them. Every write is in place, so the tensors keep their shapes
and addresses (what CUDA graphs need).
"""

from __future__ import annotations

import torch

from swamla.config import BlockKind, ModelConfig

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


def latent_len(cache) -> int:
    """S, the latent slots of the MLA layers (1 if the model has none)."""
    return next((layer["c"].shape[1] for layer in cache["layers"] if "c" in layer), 1)


def chunk_layout(cfg: ModelConfig, cache, pos, start, end, S: int) -> dict:
    """What the chunk's queries at positions ``pos`` (B, T) see, and where its tokens go.

    Rows start at ``start`` (B,); positions ``>= end`` (B,) are padding. Returns the SWA mask over
    the keys of :func:`swa_keys` (B, T, Z + W + T), the MLA mask over the S latent slots
    (B, T, S), which chunk tokens enter the ring and sink buffers, and the ring's positions after
    the chunk (``swa_pos``, written by :func:`finish_chunk_`).
    """
    B, T = pos.shape
    W, Z, dev = cfg.swa_window, cfg.swa_sink_size, pos.device
    i = pos[:, :, None]  # (B, T, 1) query positions
    # SWA keys are [sink (Z) | ring (W) | chunk (T)]; each key position is seen once (SPEC 3.1):
    # a sink slot only once it has left the window, a ring slot only inside it.
    sink_pos = torch.arange(Z, device=dev).expand(B, Z)[:, None, :]
    ring_pos = cache["swa_pos"][:, None, :]
    chunk_pos = pos[:, None, :]
    swa_mask = torch.cat([
        (sink_pos < start[:, None, None]) & (i - sink_pos >= W),
        (ring_pos >= 0) & (i - ring_pos < W),
        (chunk_pos <= i) & ((i - chunk_pos < W) | (chunk_pos < Z)),
    ], dim=-1)  # (B, T, Z + W + T)
    mla_mask = torch.arange(S, device=dev)[None, None, :] <= i  # (B, T, S): slots up to i written
    # Ring slot s takes the last real chunk position p == s (mod W), if the chunk has one.
    last = torch.minimum(end, start + T) - 1  # (B,)
    p = last[:, None] - torch.remainder(last[:, None] - torch.arange(W, device=dev), W)  # (B, W)
    ring_take = (p >= start[:, None]) & (p >= 0)
    s = torch.arange(Z, device=dev)[None, :]
    sink_take = (s >= start[:, None]) & (s < start[:, None] + T) & (s < end[:, None])
    return {"swa_mask": swa_mask, "mla_mask": mla_mask,
            "ring_take": ring_take, "ring_idx": (p - start[:, None]).clamp(0, T - 1),
            "sink_take": sink_take, "sink_idx": (s - start[:, None]).clamp(0, T - 1),
            "swa_pos": torch.where(ring_take, p, cache["swa_pos"])}


def swa_keys(layer, k, v, dtype):
    """The keys and values an SWA chunk attends over, [sink | ring | chunk] as the chunk's
    ``swa_mask`` orders them: each (B, Z + W + T, K, D) in ``dtype``."""
    k_all = torch.cat([layer["sink_k"], layer["k"], k.to(layer["k"].dtype)], dim=1).to(dtype)
    v_all = torch.cat([layer["sink_v"], layer["v"], v.to(layer["v"].dtype)], dim=1).to(dtype)
    return k_all, v_all


def write_swa_(layer, k, v, chunk) -> None:
    """In place: the chunk's keys and values (B, T, K, D) that enter the ring and sink buffers."""
    for name, new in (("k", k), ("v", v)):
        _move_(layer[name], new, chunk["ring_take"], chunk["ring_idx"])
        _move_(layer[f"sink_{name}"], new, chunk["sink_take"], chunk["sink_idx"])


def write_latent_(layer, c, k_pe, pos) -> None:
    """In place: the latents c (B, T, R) and rope keys k_pe (B, T, E) at slots ``pos`` (B, T)."""
    B, T = pos.shape
    rows = torch.arange(B, device=pos.device)[:, None].expand(B, T)
    layer["c"].index_put_((rows, pos), c.to(layer["c"].dtype))
    layer["k_pe"].index_put_((rows, pos), k_pe.to(layer["k_pe"].dtype))


def finish_chunk_(cache, chunk) -> None:
    """In place: the ring slots' positions after the chunk, once every layer has read them."""
    cache["swa_pos"].copy_(chunk["swa_pos"])


def _move_(buf, new, take, idx):
    """In place: buffer rows ``buf`` (B, W or Z, ...) <- chunk rows ``new[b, idx]`` where
    ``take``."""
    tail = (1,) * (new.dim() - 2)
    picked = new.gather(1, idx.reshape(idx.shape + tail).expand(idx.shape + new.shape[2:]))
    buf.copy_(torch.where(take.reshape(take.shape + tail), picked.to(buf.dtype), buf))
