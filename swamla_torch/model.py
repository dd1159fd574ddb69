"""The SWA-MLA language model in PyTorch (SPEC.md sections 2, 5 and 6).

Shapes: B batch, T time, C model width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from swamla.config import (BlockKind, ModelConfig, check_sequence_length, check_target_ids,
                           check_token_ids)
from swamla_torch.attention import MLAttention, SWAttention, resolve_attention_impl
from swamla_torch.layers import DynamicTanh, RMSNorm, SwiGLU, block_norm, rope_tables

IGNORE_INDEX = -100


class SWABlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = (
            block_norm(cfg), SWAttention(cfg), block_norm(cfg), SwiGLU(cfg))

    def forward(self, x, ropes, positions):
        x = x + self.attn(self.norm1(x), ropes[BlockKind.SWA], positions)
        return x + self.mlp(self.norm2(x))


class MLABlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = (
            block_norm(cfg), MLAttention(cfg), block_norm(cfg), SwiGLU(cfg))

    def forward(self, x, ropes, positions):
        x = x + self.attn(self.attn_norm(x), ropes[BlockKind.MLA], positions)
        return x + self.ffn(self.ffn_norm(x))


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
                dx[:, start:start + chunk] = d_logits @ w
                dw += (d_logits.flatten(0, 1).T @ xc.flatten(0, 1)).float()
        if want_grad:
            ctx.save_for_backward(dx, dw.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, g):
        dx, dw = ctx.saved_tensors
        return g * dx, g * dw, None, None, None, None


def chunked_cross_entropy(weight, x, targets, label_smoothing: float, chunk: int):
    """SPEC 5 mean loss through the tied head ``weight`` (V, C) over sequence chunks: float32
    logits exist for one chunk at a time and are never recomputed (``_ChunkedHeadLoss``). The
    gradients are computed only when autograd will ask for them (not under ``no_grad``)."""
    want_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _ChunkedHeadLoss.apply(x, weight, targets, label_smoothing, chunk, want_grad)


class SWAMLA(nn.Module):
    """Token ids (B, T) -> logits (B, T, V) and, given targets, the mean loss.

    With ``loss_chunk > 0`` and targets, the loss is computed over chunks of that many positions
    (logits are then not returned: None), as in ``swamla_jax.model``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        self.loss_chunk = 0
        # The trainer checks batches on the host and turns this off to avoid a device sync a step.
        self.check_inputs = True
        blocks = [SWABlock(cfg) if kind is BlockKind.SWA else MLABlock(cfg)
                  for kind in cfg.block_kinds]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(blocks),
            ln_f=block_norm(cfg),
        ))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """SPEC 6: linear weights and embedding ~ N(0, init_std); biases 0; norms 1 / 0."""
        cfg = self.config
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=cfg.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, DynamicTanh):
                m.alpha.fill_(cfg.dyt_alpha_init)
                m.weight.fill_(1.0)
                m.bias.fill_(0.0)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()

    def set_attention_impl(self, name: str, device, dtype) -> str:
        """Pick the attention kernel once for the run (attention.resolve_attention_impl)."""
        impl = resolve_attention_impl(name, torch.device(device), dtype, self.config.dropout)
        for m in self.modules():
            if isinstance(m, (SWAttention, MLAttention)):
                m.attention_impl = impl
        return impl

    def _head(self, x):
        return x @ self.transformer.wte.weight.to(x.dtype).T  # (B, T, V), tied head

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        cfg = self.config
        B, T = idx.shape
        check_sequence_length(T, cfg.block_size)
        if self.check_inputs and not torch.compiler.is_compiling():  # a host sync: no graph break
            check_token_ids(idx.detach().cpu().numpy(), cfg.vocab_size)
            if targets is not None:
                check_target_ids(targets.detach().cpu().numpy(), cfg.vocab_size)
        positions = torch.arange(T, device=idx.device)
        ropes = {
            BlockKind.SWA: rope_tables(cfg.head_dim, positions, cfg.rope_theta, cfg.rope_factor),
            BlockKind.MLA: rope_tables(cfg.qk_rope_head_dim, positions, cfg.rope_theta,
                                       cfg.rope_factor),
        }
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, ropes, positions, use_reentrant=False)
            else:
                x = block(x, ropes, positions)
        x = self.transformer.ln_f(x)
        if targets is not None and self.loss_chunk and T > self.loss_chunk:
            return None, chunked_cross_entropy(self.transformer.wte.weight, x, targets,
                                               cfg.label_smoothing, self.loss_chunk)
        logits = self._head(x)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits, targets, cfg.label_smoothing)
        return logits, loss
