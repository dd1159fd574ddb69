"""FP8 linear layers for the PyTorch trainer (``--use_fp8``) through ``torch._scaled_mm``.

The same recipe as ``swamla_jax/fp8.py``: current per-tensor scaling (``amax / fp8_max`` of each
operand, computed from the tensor itself), e4m3 for activations and weights in the forward pass,
e5m2 for the output gradient in the backward pass; the forward saves the float8 operands, not
bf16 copies. ``Fp8Linear`` keeps ``nn.Linear``'s parameters and names, so checkpoints and the
portable format are unchanged; ``use_fp8_linears`` swaps the block projections in place.
"""

from __future__ import annotations

import torch
import torch.nn as nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_TINY = 1e-12


def quantize(x: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values, float32 scale) with ``x ~= values * scale``."""
    fmax = torch.finfo(dtype).max
    scale = x.detach().abs().amax().float().clamp(min=_TINY) / fmax
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype), scale


def _mm(a, sa, b, sb, out_dtype):
    """``(a * sa) @ (b * sb)``; _scaled_mm wants ``a`` row-major and ``b`` column-major."""
    return torch._scaled_mm(a.contiguous(), b.t().contiguous().t(), scale_a=sa, scale_b=sb,
                            out_dtype=out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        lead, k = x.shape[:-1], x.shape[-1]
        qx, sx = quantize(x.reshape(-1, k), E4M3)
        qw, sw = quantize(weight, E4M3)  # (N, K)
        y = _mm(qx, sx, qw.t(), sw, x.dtype)  # (M, N)
        ctx.save_for_backward(qx, sx, qw, sw)
        ctx.shapes = (lead, x.dtype, weight.dtype)
        return y.reshape(*lead, -1)

    @staticmethod
    def backward(ctx, grad):
        qx, sx, qw, sw = ctx.saved_tensors
        lead, x_dtype, w_dtype = ctx.shapes
        qg, sg = quantize(grad.reshape(-1, grad.shape[-1]), E5M2)  # (M, N)
        dx = _mm(qg, sg, qw, sw, x_dtype).reshape(*lead, -1)  # (M, N) @ (N, K)
        dw = _mm(qg.t(), sg, qx, sx, torch.float32).to(w_dtype)  # (N, M) @ (M, K)
        return dx, dw


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose matmul runs in FP8 (bias added in the compute dtype)."""

    def forward(self, x):
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        with torch.autocast(kind, enabled=False):
            y = _Fp8Matmul.apply(x.to(dtype), self.weight.to(dtype))
        return y if self.bias is None else y + self.bias.to(dtype)


def use_fp8_linears(model: nn.Module) -> int:
    """Turn the block linears into ``Fp8Linear`` in place (the tied LM head stays bf16); returns
    how many. FP8 GEMMs need both dimensions divisible by 16; other layers stay as they are."""
    count = 0
    for block in model.transformer.h:
        for module in block.modules():
            if (type(module) is nn.Linear and module.in_features % 16 == 0
                    and module.out_features % 16 == 0):
                module.__class__ = Fp8Linear
                count += 1
    return count
