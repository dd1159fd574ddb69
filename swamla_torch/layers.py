"""Norms, RoPE and the SwiGLU MLP of SWA-MLA in PyTorch (SPEC.md sections 3 and 4).

Shapes: B batch, T time, C model width, H heads, D head dim, P = D/2 rotation pairs,
F MLP hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from swamla.config import ModelConfig
from swamla.plan import REFERENCE_PLAN, ComputePlan
from swamla_torch.kernels.fp8 import linear



class RMSNorm(nn.Module):
    """``w * x * rsqrt(mean(x^2) + eps)`` in float32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * y).to(x.dtype)


class DynamicTanh(nn.Module):
    """DyT (Zhu et al. 2025): ``tanh(alpha * x) * w + b`` with a learned scalar alpha."""

    def __init__(self, dim: int, alpha_init: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        y = torch.tanh(self.alpha.float() * x.float()) * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """Standard LayerNorm (eps 1e-5), computed in float32 like the other norms."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-5)

    def forward(self, x):
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                         self.eps)
        return y.to(x.dtype)


def block_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.use_dyt:
        return DynamicTanh(cfg.n_embd, cfg.dyt_alpha_init)
    return RMSNorm(cfg.n_embd, cfg.norm_eps)


def latent_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """Norm on MLA latents: LayerNorm, or DeepSeek's weight-only RMSNorm."""
    return LayerNorm(dim) if cfg.mla_norm == "layernorm" else RMSNorm(dim, cfg.norm_eps)


def rope_tables(dim: int, positions: torch.Tensor, theta: float, factor: float):
    """cos/sin of ``a = (t / factor) * theta ** (-2p / dim)``, float32, each ``positions.shape``
    + (P,): (T, P) for one shared row of positions, (B, T, P) for per-row positions (decoding)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angles = (positions.float() / factor)[..., None] * inv_freq  # (..., P)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2p], x[2p+1])`` of x (B, T, H, D) in float32 (SPEC 3);
    cos/sin (T, P) or (B, T, P) from :func:`rope_tables`."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, P)
    cos, sin = cos[..., None, :], sin[..., None, :]  # (T, 1, P) or (B, T, 1, P)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class SwiGLU(nn.Module):
    """``(silu(gate) * up) w_down`` with up and gate from one fused projection (SPEC 4)."""

    def __init__(self, cfg: ModelConfig, plan: ComputePlan = REFERENCE_PLAN):
        super().__init__()
        self.hidden = cfg.mlp_hidden
        self.gate_up_proj = linear(cfg.n_embd, 2 * cfg.mlp_hidden, cfg.bias, plan.fp8)
        self.down_proj = linear(cfg.mlp_hidden, cfg.n_embd, cfg.bias, plan.fp8)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        up, gate = self.gate_up_proj(x).split(self.hidden, dim=-1)  # (B, T, F) each
        return self.dropout(self.down_proj(F.silu(gate) * up))


def logit_scale(cfg: ModelConfig, positions: torch.Tensor) -> torch.Tensor:
    """Per-position query scale for long context (SPEC 3.1), float32 (T,)."""
    base = cfg.logit_scale_base
    steps = torch.floor((positions.float() + cfg.logit_scale_offset) / cfg.logit_scale_window)
    scale = torch.log(base + steps) / math.log(base)
    return scale.clamp(cfg.logit_scale_min, cfg.logit_scale_max)
