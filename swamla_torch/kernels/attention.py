"""FlexAttention (SWA + sink, block-sparse) and SDPA flash (MLA) for ``attention_impl="flex"``.

Shapes: B batch, T time (of queries and keys alike), H query heads, K kv heads, D head dim,
V value dim (D for SWA, smaller for MLA).
Only :func:`swamla_torch.attention.attention` calls :func:`fast_attention`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def fast_attention(q, k, v, scale: float, window: int | None, sink: int) -> torch.Tensor:
    """Causal attention of q (B, T, H, D) over k (B, T, K, D), v (B, T, K, V); with ``window``,
    each query also sees only its window plus the first ``sink`` positions (SPEC 3.1). Returns
    (B, T, H, V).
    """
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D), (B, K, T, D/V)
    gqa = kh.shape[1] != qh.shape[1]
    if window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                             enable_gqa=gqa)
    elif torch.compiler.is_compiling():
        # Inside the compiled model the block mask becomes part of the graph (a few tiny kernels
        # a step) and flex_attention is lowered to its fused kernel with the rest. Dynamo cannot
        # honour an lru_cache here; calling the cached helpers would only warn.
        from torch.nn.attention.flex_attention import flex_attention

        mask = _swa_block_mask(q.shape[1], window, sink, str(q.device))
        out = flex_attention(qh, kh, vh, block_mask=mask, scale=scale, enable_gqa=gqa)
    else:
        mask = _cached_swa_block_mask(q.shape[1], window, sink, str(q.device))
        out = _compiled_flex()(qh, kh, vh, block_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)  # (B, T, H, V)


def document_attention(q, k, v, segment_ids, positions, scale: float, window: int | None,
                       sink: int) -> torch.Tensor:
    """Attention within each document of packed rows (SPEC 3.3): q (B, T, H, D) over k
    (B, T, K, D), v (B, T, K, V) with ``segment_ids`` and document ``positions`` (B, T); with
    ``window``, SWA's window and each document's own sink. FlexAttention with a per-batch block
    mask, for SWA and MLA alike: tiles outside the window or across documents are skipped, so
    SWA's cost per token stays flat in T. Returns (B, T, H, V)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    B, T = segment_ids.shape

    def visible(b, h, q_idx, kv_idx):  # SPEC 3.3
        seen = (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (kv_idx <= q_idx)
        if window is None:
            return seen
        return seen & ((q_idx - kv_idx < window) | (positions[b, kv_idx] < sink))

    mask = create_block_mask(visible, B=B, H=None, Q_LEN=T, KV_LEN=T, device=str(q.device))
    attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    out = attend(qh, kh, vh, block_mask=mask, scale=scale, enable_gqa=kh.shape[1] != qh.shape[1])
    return out.transpose(1, 2)  # (B, T, H, V)


def _swa_block_mask(T: int, window: int, sink: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q_idx, kv_idx):  # SPEC 3.1
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sink))

    return create_block_mask(visible, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


_cached_swa_block_mask = functools.lru_cache(maxsize=32)(_swa_block_mask)  # eager calls


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    """For eager calls: flex_attention runs its fused kernel only compiled; eager, it
    materializes the scores."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
