"""The SWA-MLA loss in PyTorch (SPEC.md section 5): token cross entropy over targets != -100,
whole rows or one chunk of positions at a time through the tied head.

Mirrors ``swamla_jax/losses.py``. Shapes: B batch, T time, C model width, V vocabulary.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0):
    """Mean token cross entropy over targets != -100, float32 (SPEC 5).

    With smoothing eps the target class gets weight 1 - eps and every other class eps / (V - 1)
    (torch's built-in smoothing spreads eps / V over all classes, target included, so it is not
    used here).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    valid = targets != IGNORE_INDEX
    return _token_losses(logp, targets, label_smoothing).sum() / valid.sum().clamp(min=1)


def _token_losses(logp, targets, label_smoothing: float):
    """SPEC 5 loss of each position from float32 log-probabilities (..., V), 0 where the target
    is -100."""
    valid = targets != IGNORE_INDEX
    tgt = logp.gather(-1, torch.where(valid, targets, 0)[..., None])[..., 0]
    loss = -tgt
    if label_smoothing > 0.0:
        V = logp.shape[-1]
        others = logp.sum(-1) - tgt
        loss = -(1.0 - label_smoothing) * tgt - (label_smoothing / (V - 1)) * others
    return torch.where(valid, loss, 0.0)


class _ChunkedHeadLoss(torch.autograd.Function):
    """SPEC 5 mean loss through the tied head, one chunk of positions at a time; when a gradient
    is wanted, the forward pass computes it from each chunk's logits as they are made.

    The loss is linear in its cotangent, so the backward pass only scales what the forward pass
    kept (the gradients for a cotangent of 1): each chunk's logits GEMM runs once a step instead
    of again in a recomputing backward. d(loss)/d logits is rounded to the compute dtype before
    the two head-gradient GEMMs, as autograd through the autocast head does.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, label_smoothing: float, chunk: int, want_grad: bool):
        w = weight.to(x.dtype)  # (V, C) tied embedding in the compute dtype
        V = w.shape[0]
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        total = x.new_zeros((), dtype=torch.float32)
        dx = torch.empty_like(x) if want_grad else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_grad else None
        on, off = 1.0 - label_smoothing, label_smoothing / (V - 1)
        for start in range(0, x.shape[1], chunk):
            xc, tc = x[:, start:start + chunk], targets[:, start:start + chunk]
            logp = torch.log_softmax((xc @ w.T).float(), dim=-1)  # (B, chunk, V)
            total = total + _token_losses(logp, tc, label_smoothing).sum()
            if want_grad:  # softmax - smoothed one-hot, in place of the log-probabilities
                vc = valid[:, start:start + chunk, None]
                target = torch.where(vc, tc[..., None], 0)
                d_logits = logp.exp_().sub_(off).scatter_add_(
                    -1, target, torch.full_like(target, off - on, dtype=logp.dtype))
                d_logits = (torch.where(vc, d_logits, 0.0) / count).to(x.dtype)
                dx[:, start:start + chunk] = d_logits @ w  # (B, chunk, C)
                dw += (d_logits.flatten(0, 1).T @ xc.flatten(0, 1)).float()  # (V, C)
        if want_grad:
            ctx.save_for_backward(dx, dw.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, g):
        dx, dw = ctx.saved_tensors
        return g * dx, g * dw, None, None, None, None


def chunked_cross_entropy(weight, x, targets, label_smoothing: float, chunk: int):
    """SPEC 5 mean loss through the tied head ``weight`` (V, C) of ``x`` (B, T, C) over chunks of
    ``chunk`` positions: float32 logits exist for one chunk at a time and are never recomputed
    (``_ChunkedHeadLoss``). The gradients are computed only when autograd will ask for them (not
    under ``no_grad``)."""
    want_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _ChunkedHeadLoss.apply(x, weight, targets, label_smoothing, chunk, want_grad)
