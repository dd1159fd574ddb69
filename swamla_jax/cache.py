"""The KV cache of SWA-MLA in JAX (SPEC.md 3.1, 3.2): its buffers and per-chunk bookkeeping.

Shapes: B batch, T chunk time, S latent slots (the cache length), K kv heads, D head dim,
W window, Z sink slots, R kv latent rank, E rope dim.

Per layer the cache holds (``init_cache``):

- SWA: a ring of the last ``swa_window`` keys/values (slot ``p % W`` holds position p) and a sink
  buffer of the first ``swa_sink_size``: ``(W + Z) * 2 * K * D`` numbers whatever the length.
- MLA: only the normed latent ``c`` and the rotated shared ``k_pe`` per position (``R + E``
  numbers per token); attention runs in the absorbed form.

The attention modules read it and return it updated (their ``cache`` argument);
``swamla_jax.model.forward_chunk`` runs a chunk of tokens through them, layer by layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from swamla.config import BlockKind, ModelConfig

NO_POSITION = -1  # an empty ring slot


def _layer_cache(cfg: ModelConfig, kind: BlockKind, batch: int, cache_len: int, dtype):
    z = lambda *shape: jnp.zeros((batch,) + shape, dtype)  # noqa: E731
    if kind is BlockKind.SWA:
        K, D, W, Z = cfg.n_head_kv, cfg.head_dim, cfg.swa_window, cfg.swa_sink_size
        return {"k": z(W, K, D), "v": z(W, K, D), "sink_k": z(Z, K, D), "sink_v": z(Z, K, D)}
    return {"c": z(cache_len, cfg.kv_lora_rank), "k_pe": z(cache_len, cfg.qk_rope_head_dim)}


def init_cache(cfg: ModelConfig, batch: int, cache_len: int, dtype=jnp.float32) -> dict:
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


def latent_len(cache) -> int:
    """S, the latent slots of the MLA layers (1 if the model has none)."""
    return next((layer["c"].shape[1] for layer in cache["layers"].values() if "c" in layer), 1)


def chunk_layout(cfg: ModelConfig, cache, pos, start, end, S: int) -> dict:
    """What the chunk's queries at positions ``pos`` (B, T) see, and where its tokens go.

    Rows start at ``start`` (B,); positions ``>= end`` (B,) are padding. Returns the SWA mask over
    the keys of :func:`swa_keys` (B, T, Z + W + T), the MLA mask over the S latent slots
    (B, T, S), which chunk tokens enter the ring and sink buffers, and the ring's positions after
    the chunk (``swa_pos``).
    """
    B, T = pos.shape
    W, Z = cfg.swa_window, cfg.swa_sink_size
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
    return {"swa_mask": swa_mask, "mla_mask": mla_mask,
            "ring_take": ring_take, "ring_idx": jnp.clip(p - start[:, None], 0, T - 1),
            "sink_take": sink_take, "sink_idx": jnp.clip(s - start[:, None], 0, T - 1),
            "swa_pos": jnp.where(ring_take, p, cache["swa_pos"])}


def swa_keys(layer, k, v, dtype):
    """The keys and values an SWA chunk attends over, [sink | ring | chunk] as the chunk's
    ``swa_mask`` orders them: each (B, Z + W + T, K, D) in ``dtype``."""
    k_all = jnp.concatenate([layer["sink_k"], layer["k"], k.astype(layer["k"].dtype)], axis=1)
    v_all = jnp.concatenate([layer["sink_v"], layer["v"], v.astype(layer["v"].dtype)], axis=1)
    return k_all.astype(dtype), v_all.astype(dtype)


def write_swa(layer, k, v, chunk) -> dict:
    """The SWA buffers with the chunk's keys and values (B, T, K, D) that enter the ring and
    the sink."""
    k, v = k.astype(layer["k"].dtype), v.astype(layer["v"].dtype)
    return {"k": _move(layer["k"], k, chunk["ring_take"], chunk["ring_idx"]),
            "v": _move(layer["v"], v, chunk["ring_take"], chunk["ring_idx"]),
            "sink_k": _move(layer["sink_k"], k, chunk["sink_take"], chunk["sink_idx"]),
            "sink_v": _move(layer["sink_v"], v, chunk["sink_take"], chunk["sink_idx"])}


def write_latent(layer, c, k_pe, pos) -> dict:
    """The MLA buffers with the latents c (B, T, R) and rope keys k_pe (B, T, E) at slots
    ``pos`` (B, T); slots past the cache's end are dropped."""
    rows = jnp.arange(pos.shape[0])[:, None]
    return {"c": layer["c"].at[rows, pos].set(c.astype(layer["c"].dtype), mode="drop"),
            "k_pe": layer["k_pe"].at[rows, pos].set(k_pe.astype(layer["k_pe"].dtype),
                                                    mode="drop")}


def _move(old, new, take, idx):
    """Buffer rows ``old`` (B, W or Z, ...) replaced by chunk rows ``new[b, idx]`` where
    ``take``."""
    picked = jnp.take_along_axis(new, idx.reshape(idx.shape + (1,) * (new.ndim - 2)), axis=1)
    return jnp.where(take.reshape(take.shape + (1,) * (new.ndim - 2)), picked, old)
