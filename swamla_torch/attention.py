"""SWA and MLA attention of SWA-MLA in PyTorch (SPEC.md section 3).

Shapes: B batch, T query time, S key time, C model width, H query heads, K kv heads,
G = H / K heads per kv group, D head dim, R kv latent rank (kv_lora_rank), Q q latent rank,
N nope dim, E rope dim, V value dim.

Which attention kernel runs is decided in :func:`attention` alone; the blocks only describe the
mask (causal, window, sink).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from swamla.config import ModelConfig
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


ATTENTION_IMPLS = ("auto", "reference", "flex")


def resolve_attention_impl(name: str, device: torch.device, dtype: torch.dtype,
                           dropout: float) -> str:
    """The one place a kernel is chosen: FlexAttention (SWA, block-sparse) and SDPA flash (MLA)
    on CUDA in 16-bit without dropout (``auto``), else the reference path, exact in float32."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS} for PyTorch, got {name!r}")
    if name == "auto":
        fast = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and dropout == 0
        return "flex" if fast else "reference"
    if name == "flex" and dropout > 0:
        raise ValueError("attention_impl='flex' needs dropout 0; use 'reference'")
    return name


def attention(q, k, v, *, scale: float, window: int | None = None, sink: int = 0,
              dropout_p: float = 0.0, impl: str = "reference") -> torch.Tensor:
    """Causal (optionally windowed + sink) attention; q (B,T,H,D), k (B,S,K,D), v (B,S,K,V).

    ``impl="reference"``: explicit float32 scores and softmax, exact to the SPEC on any device.
    ``impl="flex"``: FlexAttention with a block mask (tiles outside window + sink are skipped)
    for SWA, and SDPA's flash/cuDNN kernels for plain causal MLA attention.
    """
    if impl == "flex":
        return _fast_attention(q, k, v, scale, window, sink)
    B, T, H, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    qh = q.transpose(1, 2)  # (B, H, T, D)
    kh = k.repeat_interleave(G, dim=2).transpose(1, 2)  # (B, H, S, D): head h reads kv head h // G
    vh = v.repeat_interleave(G, dim=2).transpose(1, 2)  # (B, H, S, V)
    scores = torch.matmul(qh.float(), kh.float().transpose(-1, -2)) * scale  # (B, H, T, S)
    mask = visible_mask(T, S, window, sink, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs.to(vh.dtype), vh)  # (B, H, T, V)
    return out.transpose(1, 2)  # (B, T, H, V)


def _swa_block_mask(T: int, window: int, sink: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q_idx, kv_idx):  # SPEC 3.1
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sink))

    return create_block_mask(visible, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


_cached_swa_block_mask = functools.lru_cache(maxsize=32)(_swa_block_mask)  # eager calls


def _fast_attention(q, k, v, scale, window, sink):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    gqa = kh.shape[1] != qh.shape[1]
    if window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                             enable_gqa=gqa)
    elif torch.compiler.is_compiling():
        # Inside the compiled model: the block mask becomes part of the graph (a few tiny
        # kernels a step) and flex_attention is lowered to its fused kernel with the rest. Dynamo
        # cannot honour an lru_cache here; calling the cached helpers would only warn.
        from torch.nn.attention.flex_attention import flex_attention

        mask = _swa_block_mask(q.shape[1], window, sink, str(q.device))
        out = flex_attention(qh, kh, vh, block_mask=mask, scale=scale, enable_gqa=gqa)
    else:
        mask = _cached_swa_block_mask(q.shape[1], window, sink, str(q.device))
        out = _compiled_flex()(qh, kh, vh, block_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    """Eager calls: flex_attention only runs its fused kernel compiled; eager it materializes
    the scores."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class SWAttention(nn.Module):
    """Sliding-window attention with an attention sink, RoPE and grouped-query heads (SPEC 3.1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.attention_impl = "reference"  # set by SWAMLA.set_attention_impl
        C, kv = cfg.n_embd, cfg.n_head_kv * cfg.head_dim
        self.q_proj = nn.Linear(C, C, bias=cfg.bias)
        self.k_proj = nn.Linear(C, kv, bias=cfg.bias)
        self.v_proj = nn.Linear(C, kv, bias=cfg.bias)
        self.o_proj = nn.Linear(C, C, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, positions):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.k_proj(x).view(B, T, cfg.n_head_kv, cfg.head_dim)
        v = self.v_proj(x).view(B, T, cfg.n_head_kv, cfg.head_dim)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cfg.logit_scale_base is not None and (not self.training
                                                 or cfg.apply_logit_scale_during_training):
            q = (q.float() * logit_scale(cfg, positions)[:, None, None]).to(q.dtype)
        y = attention(q, k, v, scale=cfg.head_dim ** -0.5, window=cfg.swa_window,
                      sink=cfg.swa_sink_size, dropout_p=cfg.dropout if self.training else 0.0,
                      impl=self.attention_impl)
        return self.resid_dropout(self.o_proj(y.reshape(B, T, -1)))


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention, expanded form (SPEC 3.2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.attention_impl = "reference"  # set by SWAMLA.set_attention_impl
        C, H = cfg.n_embd, cfg.n_head
        dqk, dn, dv, r, dr = (cfg.mla_qk_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim,
                              cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(C, cfg.q_lora_rank, bias=cfg.bias)
            self.q_norm = latent_norm(cfg, cfg.q_lora_rank)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * dqk, bias=cfg.bias)
        else:
            self.wq = nn.Linear(C, H * dqk, bias=cfg.bias)
        self.wkv_a = nn.Linear(C, r + dr, bias=cfg.bias)
        self.kv_norm = latent_norm(cfg, r)
        self.wkv_b = nn.Linear(r, H * (dn + dv), bias=cfg.bias)
        self.wo = nn.Linear(H * dv, C, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, positions):
        cfg = self.cfg
        B, T, _ = x.shape
        H, dn, dv, r = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q = self.wq_b(self.q_norm(self.wq_a(x))) if cfg.q_lora_rank else self.wq(x)
        q = q.view(B, T, H, cfg.mla_qk_head_dim)
        cos, sin = rope
        q = torch.cat((q[..., :dn], apply_rope(q[..., dn:], cos, sin)), dim=-1)  # (B, T, H, N+E)
        latent = self.wkv_a(x)  # (B, T, R+E)
        c = self.kv_norm(latent[..., :r])  # (B, T, R)
        k_pe = apply_rope(latent[..., None, r:], cos, sin)  # (B, T, 1, E): one key for all heads
        kv = self.wkv_b(c).view(B, T, H, dn + dv)
        k = torch.cat((kv[..., :dn], k_pe.expand(B, T, H, -1)), dim=-1)  # (B, T, H, N+E)
        v = kv[..., dn:]  # (B, T, H, V)
        y = attention(q, k, v, scale=cfg.mla_qk_head_dim ** -0.5,
                      dropout_p=cfg.dropout if self.training else 0.0, impl=self.attention_impl)
        return self.resid_dropout(self.wo(y.reshape(B, T, H * dv)))
