"""FP8 linear layers (``plan.fp8``, the trainer's ``--use_fp8``) through ``torch._scaled_mm``.

The same recipe as ``swamla_jax/kernels/fp8.py``: current per-tensor scaling (``amax / fp8_max``
of each operand, computed from the tensor itself), e4m3 for activations and weights in the
forward pass, e5m2 for the output gradient in the backward pass; the forward saves the float8
operands, not bf16 copies. ``Fp8Linear`` keeps ``nn.Linear``'s parameters and names, so
checkpoints and the portable format are unchanged; :func:`linear` is how the blocks build their
projections, FP8 or not, at construction.

Shapes: M rows (all positions), I input features, O output features; the weight is stored
(O, I), as ``nn.Linear``'s.
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
        lead, n_in = x.shape[:-1], x.shape[-1]
        qx, sx = quantize(x.reshape(-1, n_in), E4M3)  # (M, I)
        qw, sw = quantize(weight, E4M3)  # (O, I)
        y = _mm(qx, sx, qw.t(), sw, x.dtype)  # (M, I) @ (I, O) -> (M, O)
        ctx.save_for_backward(qx, sx, qw, sw)
        ctx.shapes = (lead, x.dtype, weight.dtype)
        return y.reshape(*lead, -1)

    @staticmethod
    def backward(ctx, grad):
        qx, sx, qw, sw = ctx.saved_tensors
        lead, x_dtype, w_dtype = ctx.shapes
        qg, sg = quantize(grad.reshape(-1, grad.shape[-1]), E5M2)  # (M, O)
        dx = _mm(qg, sg, qw, sw, x_dtype).reshape(*lead, -1)  # (M, O) @ (O, I)
        dw = _mm(qg.t(), sg, qx, sx, torch.float32).to(w_dtype)  # (O, M) @ (M, I)
        return dx, dw


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose matmul runs in FP8 (bias added in the compute dtype)."""

    def forward(self, x):
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        with torch.autocast(kind, enabled=False):
            y = _Fp8Matmul.apply(x.to(dtype), self.weight.to(dtype))
        return y if self.bias is None else y + self.bias.to(dtype)


def linear(in_features: int, out_features: int, bias: bool, fp8: bool) -> nn.Linear:
    """A block projection: ``Fp8Linear`` when ``fp8`` and both dimensions are multiples of 16
    (``_scaled_mm``'s constraint), else ``nn.Linear``. The tied LM head is never FP8."""
    fits = in_features % 16 == 0 and out_features % 16 == 0
    return (Fp8Linear if fp8 and fits else nn.Linear)(in_features, out_features, bias=bias)
