"""Fast attention over packed rows whose documents stay apart (SPEC.md section 3.3), for
``plan.attention_impl == "cudnn"`` with ``segment_ids``; reached through
``swamla_jax.attention.attention``.

Shapes: B batch, T time, H query heads, K kv heads, G = H / K heads per kv group, D head dim,
V value dim, Z sink keys per document, n blocks of L = W (the window) positions, M = 2L keys.

* SWA: blocked local attention in XLA. A query's window lies within its own block of W
  positions and the block before, so each block of queries meets 2W keys: cost per token is
  flat in T. Each document's sink keys that fall out of the window are gathered per query
  (Z of them) and join the same softmax. The function is rematerialized: the backward pass
  recomputes the (B, n, H, L, 2L) scores instead of keeping them.
* MLA: the Pallas (Triton) flash attention of ``jax.experimental.pallas.ops.gpu``, which masks by
  segment ids and skips the tiles above the diagonal; the value is zero-padded to the query's
  head dim, which that kernel requires. Off GPU it runs in Pallas' interpreter (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

f32 = jnp.float32


def swa_document_attention(q, k, v, segment_ids, positions, *, scale: float, window: int,
                           sink: int):
    """q (B, T, H, D), k (B, T, K, D), v (B, T, K, V); segment_ids and document positions
    (B, T) -> (B, T, H, V): query i sees key j of its own document iff ``j <= i`` and
    (``i - j < window`` or ``positions[j] < sink``)."""
    return _swa_documents(q, k, v, segment_ids, positions, scale, window, sink)


@functools.partial(jax.checkpoint, static_argnums=(5, 6, 7))
def _swa_documents(q, k, v, seg, pos, scale, window, sink):
    B, T, H, D = q.shape
    K, V = k.shape[2], v.shape[-1]
    G, L = H // K, window
    n = -(-T // L)
    if n * L != T:  # pad to whole blocks: padding is a document of its own (-1)
        widths = ((0, 0), (0, n * L - T))
        q, k, v = (jnp.pad(x, widths + ((0, 0), (0, 0))) for x in (q, k, v))
        seg = jnp.pad(seg, widths, constant_values=-1)
        pos = jnp.pad(pos, widths)
    S = n * L

    def pairs(x, fill):  # (B, S, ...) -> (B, n, M, ...): block c-1's positions, then c's
        xb = x.reshape(x.shape[0], n, L, *x.shape[2:])
        prev = jnp.concatenate([jnp.full_like(xb[:, :1], fill), xb[:, :-1]], axis=1)
        return jnp.concatenate([prev, xb], axis=2)

    t = jnp.arange(S)
    i = t.reshape(n, L)[:, :, None]  # (n, L, 1) query times
    j = pairs(t[None], 0)[0][:, None, :]  # (n, 1, M) key times
    seg_q = seg.reshape(B, n, L)[..., None]
    seg_k = pairs(seg, -2)[:, :, None, :]  # before the first block: no document
    visible = (seg_q == seg_k) & (j <= i) & (i - j < window)  # (B, n, L, M)
    qb = q.reshape(B, n, L, K, G, D)
    scores = jnp.einsum("BnLKGD,BnMKD->BnKGLM", qb, pairs(k, 0),
                        preferred_element_type=f32) * scale
    scores = jnp.where(visible[:, :, None, None], scores, -jnp.inf)
    Z = sink
    if Z:  # each document's first Z keys, where they lie out of the query's window
        slots = jnp.arange(Z)
        first = (t[None] - pos)[..., None] + slots  # (B, S, Z) key times of the sinks
        gather = jax.vmap(lambda x, idx: x[idx])  # per row: (S, Z, ...) rows of x
        k_s = gather(k, jnp.minimum(first, S - 1))  # (B, S, Z, K, D)
        s_s = jnp.einsum("BSKGD,BSZKD->BSKGZ", q.reshape(B, S, K, G, D), k_s,
                         preferred_element_type=f32) * scale
        out_of_window = pos[..., None] - slots >= window  # (B, S, Z)
        s_s = jnp.where(out_of_window[:, :, None, None], s_s, -jnp.inf)
        s_s = s_s.reshape(B, n, L, K, G, Z).transpose(0, 1, 3, 4, 2, 5)  # (B, n, K, G, L, Z)
        scores = jnp.concatenate([scores, s_s], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BnKGLM,BnMKV->BnLKGV", probs[..., :2 * L], pairs(v, 0),
                     preferred_element_type=f32).reshape(B, S, K, G, V)
    if Z:
        p_s = probs[..., 2 * L:].transpose(0, 1, 4, 2, 3, 5).reshape(B, S, K, G, Z)
        out = out + jnp.einsum("BSKGZ,BSZKV->BSKGV", p_s, gather(v, jnp.minimum(first, S - 1)),
                               preferred_element_type=f32)
    return out.reshape(B, S, H, V)[:, :T].astype(q.dtype)


def causal_document_attention(q, k, v, segment_ids, *, scale: float, block: int = 64,
                              interpret: bool | None = None):
    """q (B, T, H, D), k (B, T, H, D), v (B, T, H, V) -> (B, T, H, V): causal attention within
    each document (``segment_ids`` (B, T)); ``block`` is the kernel's query and key tile."""
    from jax.experimental.pallas.ops.gpu.attention import BlockSizes, mha

    B, T, H, D = q.shape
    V = v.shape[-1]
    if k.shape[2] != H:  # grouped heads: the kernel wants one kv head per query head
        k, v = (jnp.repeat(x, H // x.shape[2], axis=2) for x in (k, v))
    if V < D:
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, D - V)))
    tile = min(block, 1 << (T - 1).bit_length())
    S = -(-T // tile) * tile
    if S != T:  # whole tiles: padding is a document of its own (-1), after every real one
        widths = ((0, 0), (0, S - T))
        q, k, v = (jnp.pad(x, widths + ((0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, widths, constant_values=-1)
    small = min(tile, 32)
    sizes = BlockSizes(block_q=tile, block_k=tile, block_q_dkv=small, block_kv_dkv=small,
                       block_q_dq=small, block_kv_dq=small)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    out = mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=scale, causal=True,
              block_sizes=sizes, interpret=interpret)
    return out[:, :T, :, :V]
