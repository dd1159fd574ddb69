"""SWA and MLA attention of SWA-MLA in PyTorch (SPEC.md section 3), training and cached forms.

Shapes: B batch, T query time, S key time, C model width, H query heads, K kv heads,
G = H / K heads per kv group, D head dim, P = D/2 rotation pairs, R kv latent rank,
N nope dim, E rope dim, V value dim, W window, Z sink slots.

Each module has one ``forward``: without ``cache`` it attends over the whole sequence (training,
evaluation); with this layer's ``cache`` buffers (``swamla_torch.cache``) it runs a chunk of new
tokens against them and writes the chunk in place. Which kernel runs is decided in
:func:`attention` alone, from the compute plan; the modules only describe the mask.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from swamla.config import ModelConfig
from swamla.plan import ComputePlan, REFERENCE_PLAN
from swamla_torch.cache import swa_keys, write_latent_, write_swa_
from swamla_torch.kernels.attention import document_attention, fast_attention
from swamla_torch.kernels.fp8 import linear
from swamla_torch.layers import apply_rope, latent_norm, logit_scale


def visible_mask(T: int, S: int, window: int | None, sink: int, device) -> torch.Tensor:
    """(T, S) bool: query i sees key j iff j <= i and (i - j < window or j < sink) (SPEC 3.1).

    Queries are the last T of the S key positions (S == T without a cache).
    """
    i = torch.arange(S - T, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask &= (i - j < window) | (j < sink)
    return mask


def document_mask(segment_ids: torch.Tensor, positions: torch.Tensor, window: int | None,
                  sink: int) -> torch.Tensor:
    """(B, T, T) bool, SPEC 3.3: query i sees key j iff both are in one document, j <= i and
    (without a window) always, (with one) ``i - j < window`` or ``positions[j] < sink``, the
    positions counted from each document's start."""
    T = segment_ids.shape[1]
    i = torch.arange(T, device=segment_ids.device)[:, None]
    j = torch.arange(T, device=segment_ids.device)[None, :]
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (j <= i)
    if window is not None:
        mask &= (i - j < window) | (positions[:, None, :] < sink)
    return mask


def attention(q, k, v, *, scale: float, window: int | None = None, sink: int = 0,
              mask: torch.Tensor | None = None, documents=None, dropout_p: float = 0.0,
              impl: str = "reference") -> torch.Tensor:
    """Causal (optionally windowed + sink) attention; q (B, T, H, D), k (B, S, K, D),
    v (B, S, K, V) -> (B, T, H, V).

    ``impl="reference"``: explicit float32 scores and softmax, exact to the SPEC on any device.
    ``mask`` (B, T, S) then replaces the causal one: the cached path, whose keys are not in
    time order. ``documents`` = (segment_ids, positions), each (B, T): a packed row whose
    documents attend only within themselves (SPEC 3.3). ``impl="flex"`` (``kernels.attention``):
    FlexAttention with a block mask (tiles outside window + sink, or outside the documents, are
    skipped) for SWA and for documents, SDPA's flash/cuDNN kernels for causal MLA.
    """
    if impl == "flex":
        if documents is not None:
            return document_attention(q, k, v, *documents, scale, window, sink)
        return fast_attention(q, k, v, scale, window, sink)
    if documents is not None:
        mask = document_mask(*documents, window, sink)
    T, S = q.shape[1], k.shape[1]
    G = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)  # (B, H, T, D)
    kh = k.repeat_interleave(G, dim=2).transpose(1, 2)  # (B, H, S, D): head h reads kv head h // G
    vh = v.repeat_interleave(G, dim=2).transpose(1, 2)  # (B, H, S, V)
    scores = torch.matmul(qh.float(), kh.float().transpose(-1, -2)) * scale  # (B, H, T, S)
    if mask is None:
        mask = visible_mask(T, S, window, sink, q.device)  # (T, S)
    else:
        mask = mask[:, None]  # (B, 1, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs.to(vh.dtype), vh)  # (B, H, T, V)
    return out.transpose(1, 2)  # (B, T, H, V)


class SWAttention(nn.Module):
    """Sliding-window attention with an attention sink, RoPE and grouped-query heads (SPEC 3.1).

    The cache holds a ring of the last W keys/values and the first Z (the sink).
    """

    def __init__(self, cfg: ModelConfig, plan: ComputePlan = REFERENCE_PLAN):
        super().__init__()
        self.cfg, self.impl = cfg, plan.attention_impl
        C, kv = cfg.n_embd, cfg.n_head_kv * cfg.head_dim
        self.q_proj = linear(C, C, cfg.bias, plan.fp8)
        self.k_proj = linear(C, kv, cfg.bias, plan.fp8)
        self.v_proj = linear(C, kv, cfg.bias, plan.fp8)
        self.o_proj = linear(C, C, cfg.bias, plan.fp8)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, positions, cache=None, chunk=None, segment_ids=None):
        """x (B, T, C) -> (B, T, C).

        Whole sequences: ``positions`` (T,), ``rope`` cos/sin (T, P); with ``segment_ids``
        (B, T), a packed row of documents (SPEC 3.3), ``positions`` and ``rope`` then per row,
        counted from each document's start. A cached chunk: ``cache``
        this layer's buffers, ``chunk`` from ``cache.chunk_layout``, ``positions`` (B, T) per
        row, ``rope`` (B, T, P); the chunk's keys and values enter the buffers in place.
        """
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, cfg.n_head_kv, cfg.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, cfg.n_head_kv, cfg.head_dim)  # (B, T, K, D)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # SPEC 3.1: inference always scales; training only if the config asks.
        if cfg.logit_scale_base is not None and (cache is not None or not self.training
                                                 or cfg.apply_logit_scale_during_training):
            q = (q.float() * logit_scale(cfg, positions)[..., None, None]).to(q.dtype)
        scale = cfg.head_dim ** -0.5
        if cache is None:
            y = attention(q, k, v, scale=scale, window=cfg.swa_window, sink=cfg.swa_sink_size,
                          documents=_documents(segment_ids, positions),
                          dropout_p=cfg.dropout if self.training else 0.0, impl=self.impl)
        else:  # the reference path: the flash kernels take no per-row mask
            k_all, v_all = swa_keys(cache, k, v, q.dtype)  # (B, Z + W + T, K, D)
            y = attention(q, k_all, v_all, scale=scale, mask=chunk["swa_mask"])
            write_swa_(cache, k, v, chunk)
        return self.resid_dropout(self.o_proj(y.reshape(B, T, -1)))


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (SPEC 3.2): the expanded form over whole
    sequences, the absorbed form over a cache of latents, as DeepSeek-V3's inference MLA."""

    def __init__(self, cfg: ModelConfig, plan: ComputePlan = REFERENCE_PLAN):
        super().__init__()
        self.cfg, self.impl = cfg, plan.attention_impl
        C, H = cfg.n_embd, cfg.n_head
        dqk, dn, dv, r, dr = (cfg.mla_qk_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim,
                              cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        if cfg.q_lora_rank:
            self.wq_a = linear(C, cfg.q_lora_rank, cfg.bias, plan.fp8)
            self.q_norm = latent_norm(cfg, cfg.q_lora_rank)
            self.wq_b = linear(cfg.q_lora_rank, H * dqk, cfg.bias, plan.fp8)
        else:
            self.wq = linear(C, H * dqk, cfg.bias, plan.fp8)
        self.wkv_a = linear(C, r + dr, cfg.bias, plan.fp8)
        self.kv_norm = latent_norm(cfg, r)
        self.wkv_b = linear(r, H * (dn + dv), cfg.bias, plan.fp8)
        self.wo = linear(H * dv, C, cfg.bias, plan.fp8)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, positions, cache=None, chunk=None, segment_ids=None):
        """x (B, T, C) -> (B, T, C); arguments as ``SWAttention.forward``. With a cache, only the
        chunk's latents c and rope keys k_pe are stored, at slots ``positions``."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, dn, dv, r = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q = self.wq_b(self.q_norm(self.wq_a(x))) if cfg.q_lora_rank else self.wq(x)
        q = q.view(B, T, H, cfg.mla_qk_head_dim)  # (B, T, H, N+E)
        cos, sin = rope
        q_nope, q_pe = q[..., :dn], apply_rope(q[..., dn:], cos, sin)  # (B, T, H, N), (B, T, H, E)
        latent = self.wkv_a(x)  # (B, T, R+E)
        c = self.kv_norm(latent[..., :r])  # (B, T, R)
        k_pe = apply_rope(latent[..., None, r:], cos, sin)  # (B, T, 1, E): one key for all heads
        if cache is None:
            y = self._expanded(q_nope, q_pe, c, k_pe, _documents(segment_ids, positions))
        else:
            write_latent_(cache, c, k_pe[:, :, 0], positions)
            y = self._absorbed(q_nope, q_pe, cache, chunk["mla_mask"])
        return self.resid_dropout(self.wo(y.reshape(B, T, H * dv)))

    def _expanded(self, q_nope, q_pe, c, k_pe, documents):
        """SPEC 3.2 as written: per-head keys and values from the latents; (B, T, H, V)."""
        cfg = self.cfg
        B, T, H, dn = q_nope.shape
        kv = self.wkv_b(c).view(B, T, H, dn + cfg.v_head_dim)
        k = torch.cat((kv[..., :dn], k_pe.expand(B, T, H, -1)), dim=-1)  # (B, T, H, N+E)
        v = kv[..., dn:]  # (B, T, H, V)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, T, H, N+E)
        return attention(q, k, v, scale=cfg.mla_qk_head_dim ** -0.5, documents=documents,
                         dropout_p=cfg.dropout if self.training else 0.0, impl=self.impl)

    def _absorbed(self, q_nope, q_pe, cache, mask):
        """Attention over the S cached latents, W_kv_b folded into the query and the output:
        ``q_nope . (c W_uk) = (q_nope W_uk^T) . c`` and
        ``sum_j p_j (c_j W_uv) = (sum_j p_j c_j) W_uv``; mask (B, T, S); returns (B, T, H, V)."""
        cfg = self.cfg
        H, dn, dv, r = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        dtype = q_nope.dtype
        c_all, kpe_all = cache["c"].to(dtype), cache["k_pe"].to(dtype)  # (B, S, R), (B, S, E)
        w = self.wkv_b.weight.view(H, dn + dv, r).to(dtype)
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # (H, N, R), (H, V, R)
        q_c = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)  # (B, T, H, R)
        # Products in the compute dtype, then float32 (as DeepSeek's reference inference does):
        # casting the whole latent cache to float32 every step would multiply its memory traffic.
        scores = (torch.einsum("bthr,bsr->bhts", q_c, c_all).float()
                  + torch.einsum("bthe,bse->bhts", q_pe.to(dtype), kpe_all).float())  # (B, H, T, S)
        bias = self.wkv_b.bias
        if bias is not None:  # q_nope . b_k: one shift per query and head (kept for exactness)
            b = bias.view(H, dn + dv).to(dtype)
            scores = scores + torch.einsum("bthn,hn->bht", q_nope.float(),
                                           b[:, :dn].float())[..., None]
        scores = (scores * cfg.mla_qk_head_dim ** -0.5).masked_fill(~mask[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o_latent = torch.einsum("bhts,bsr->bthr", probs.to(dtype), c_all)  # (B, T, H, R)
        o = torch.einsum("bthr,hvr->bthv", o_latent, w_uv)  # (B, T, H, V)
        if bias is not None:  # the weights sum to one, so the v bias passes through unchanged
            o = o + b[:, dn:]
        return o


def _documents(segment_ids, positions):
    return None if segment_ids is None else (segment_ids, positions)
