"""Fast attention over packed rows whose documents stay apart (SPEC.md section 3.3), for
``plan.attention_impl == "cudnn"`` with ``segment_ids``; reached through
``swamla_jax.attention.attention``.

Shapes: B batch, T time, H query heads, K kv heads, G = H / K heads per kv group, D head dim,
V value dim, Z sink keys per document, n blocks of L = W (the window) positions, M = 2L keys.

* SWA: blocked local attention in XLA. A query's window lies within its own block of W
  positions and the block before, so each block of queries meets 2W keys: cost per token is
  flat in T. The sinks of documents that start in those two blocks are among those keys; a
  query whose document starts earlier belongs to the one document holding the block before's
  first position, whose Z sink keys join the block's keys (a per-query gather of sinks cost
  ten times the whole attention in its backward scatter). The function is rematerialized: the
  backward pass recomputes the (B, n, H, L, Z + 2L) scores instead of keeping them.
* MLA: cuDNN's flash attention over packed sequences (each document one cuDNN sequence, given
  by offsets and lengths) when every row holds at most ``max_docs`` documents, which covers
  pretraining text (FineWeb-Edu's documents average ~1000 tokens); otherwise, chosen at run time,
  the Pallas (Triton) flash attention of ``jax.experimental.pallas.ops.gpu``, which masks by
  segment ids (4x cuDNN's time on an H100). Off GPU the Pallas kernel runs in its interpreter
  (tests).
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
    G, L, Z = H // K, window, sink
    n = -(-T // L)
    if n * L != T:  # pad to whole blocks: padding is a document of its own (-1)
        widths = ((0, 0), (0, n * L - T))
        q, k, v = (jnp.pad(x, widths + ((0, 0), (0, 0))) for x in (q, k, v))
        seg = jnp.pad(seg, widths, constant_values=-1)
        pos = jnp.pad(pos, widths)
    S = n * L

    def pairs(x, fill):  # (B, S, ...) -> (B, n, 2L, ...): block c-1's positions, then c's
        xb = x.reshape(x.shape[0], n, L, *x.shape[2:])
        prev = jnp.concatenate([jnp.full_like(xb[:, :1], fill), xb[:, :-1]], axis=1)
        return jnp.concatenate([prev, xb], axis=2)

    t = jnp.arange(S)
    i = t.reshape(n, L)[:, :, None]  # (n, L, 1) query times
    j = pairs(t[None], 0)[0][:, None, :]  # (n, 1, 2L) key times
    seg_q = seg.reshape(B, n, L)[..., None]  # (B, n, L, 1)
    # Keys of blocks c-1 and c: the window, and the sinks of documents that start in them.
    visible = ((seg_q == pairs(seg, -2)[:, :, None, :]) & (j <= i)
               & ((i - j < window) | (pairs(pos, Z)[:, :, None, :] < Z)))  # (B, n, L, 2L)
    keys, values = pairs(k, 0), pairs(v, 0)  # (B, n, 2L, K, D)
    if Z:
        # A query of block c whose document starts before block c-1 belongs to the document
        # holding position (c-1)L: one document per block, whose Z sink keys join the block's.
        anchor = jnp.maximum(jnp.arange(n) - 1, 0) * L  # (n,)
        first = (t[None] - pos)[:, anchor]  # (B, n) its start
        sink_t = first[..., None] + jnp.arange(Z)  # (B, n, Z)
        before = (sink_t < anchor[:, None]) & (jnp.arange(n) > 0)[:, None]
        sink_seg = jnp.where(before, seg[:, anchor][..., None], -2)  # -2: not a sink here
        rows = jax.vmap(lambda x, idx: x[idx])  # per batch row: (n, Z, ...) of x
        idx = jnp.minimum(sink_t, S - 1)
        keys = jnp.concatenate([rows(k, idx), keys], axis=2)  # (B, n, Z + 2L, K, D)
        values = jnp.concatenate([rows(v, idx), values], axis=2)
        visible = jnp.concatenate([seg_q == sink_seg[:, :, None, :], visible], axis=-1)
    scores = jnp.einsum("BnLKGD,BnMKD->BnKGLM", q.reshape(B, n, L, K, G, D), keys,
                        preferred_element_type=f32) * scale
    scores = jnp.where(visible[:, :, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BnKGLM,BnMKV->BnLKGV", probs, values, preferred_element_type=f32)
    return out.reshape(B, S, H, V)[:, :T].astype(q.dtype)


def causal_document_attention(q, k, v, segment_ids, *, scale: float, max_docs: int = 16,
                              interpret: bool | None = None):
    """q (B, T, H, D), k (B, T, H, D), v (B, T, H, V) -> (B, T, H, V): causal attention within
    each document (``segment_ids`` (B, T)). On GPU, cuDNN's packed-sequence flash attention when
    no row holds more than ``max_docs`` documents (the bound is static), else the Pallas kernel;
    elsewhere the Pallas kernel in its interpreter."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if interpret:
        return pallas_document_attention(q, k, v, segment_ids, scale=scale, interpret=True)
    first = _document_starts(segment_ids)
    most = jnp.max(jnp.sum(first, axis=1))
    return jax.lax.cond(
        most <= max_docs,
        lambda *a: cudnn_document_attention(*a, scale=scale, max_docs=max_docs),
        lambda *a: pallas_document_attention(*a, scale=scale), q, k, v, segment_ids)


def _document_starts(segment_ids):
    """(B, T) bool: where a document starts (a run of equal ids)."""
    B = segment_ids.shape[0]
    return jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                           axis=1)


def pallas_document_attention(q, k, v, segment_ids, *, scale: float, block: int = 64,
                              interpret: bool = False):
    """:func:`causal_document_attention` on the Pallas (Triton) flash attention of
    ``jax.experimental.pallas.ops.gpu``; ``block`` is its query and key tile (128 exceeds the
    H100's shared memory at MLA's head dims)."""
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
    out = mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=scale, causal=True,
              block_sizes=sizes, interpret=interpret)
    return out[:, :T, :, :V]


def cudnn_document_attention(q, k, v, segment_ids, *, scale: float, max_docs: int):
    """:func:`causal_document_attention` on cuDNN's packed-sequence (ragged offsets) flash
    attention: each row's documents are cuDNN sequences of their own; rows may hold at most
    ``max_docs`` documents. The value is zero-padded to the query's head dim: with packed
    sequences cuDNN's own MLA mode (qk 192, v 128) faults (illegal address, H100, JAX 0.11.2)."""
    from swamla_jax.kernels.attention import _cudnn

    cudnn = _cudnn()
    B, T = segment_ids.shape
    doc = jnp.cumsum(_document_starts(segment_ids), axis=1, dtype=jnp.int32) - 1  # (B, T)
    lengths = jax.vmap(lambda d: jnp.bincount(d, length=max_docs))(doc).astype(jnp.int32)
    valid = jnp.arange(max_docs)[None] <= doc[:, -1:]
    seqlen = jnp.where(valid, lengths, -1)
    starts = jnp.where(valid, jnp.cumsum(lengths, axis=1) - lengths, -1)
    offsets = jnp.concatenate([starts, jnp.full((B, 1), -1, jnp.int32)], axis=1)
    V = v.shape[-1]
    if V < q.shape[-1]:
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - V)))
    out = cudnn.dot_product_attention(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen,
                                      q_offsets=offsets, kv_offsets=offsets, scale=scale,
                                      mask_type=cudnn.MaskType.CAUSAL)
    return out[..., :V]
