"""The SWA-MLA language model in PyTorch (SPEC.md sections 2, 5 and 6).

Shapes: B batch, T time, C model width, V vocabulary.

One model serves training and cached generation: ``forward`` runs whole sequences,
``forward_chunk`` runs a chunk of new tokens per row against a cache (``swamla_torch.cache``)
through the same blocks. How it runs (attention kernel, FP8, recomputation, loss chunking) is
the :class:`~swamla.plan.ComputePlan` it is built with.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from swamla.config import (BlockKind, ModelConfig, check_input_shapes, check_target_ids,
                           check_token_ids)
from swamla.layout import BLOCK_NAMES
from swamla.plan import ComputePlan, REFERENCE_PLAN
from swamla_torch.attention import MLAttention, SWAttention
from swamla_torch.cache import chunk_layout, finish_chunk_, latent_len
from swamla_torch.layers import (DynamicTanh, RMSNorm, SwiGLU, block_norm,
                                 rope_tables)
from swamla_torch.losses import chunked_cross_entropy, cross_entropy

ATTENTION = {BlockKind.SWA: SWAttention, BlockKind.MLA: MLAttention}


class Block(nn.Module):
    """``x + Attn(Norm_a(x))``, then ``+ MLP(Norm_m(x))`` (SPEC 2), for either block kind.

    The sub-modules carry each kind's portable names (``swamla.layout.BLOCK_NAMES``): ``norm1,
    attn, norm2, mlp`` for SWA, ``attn_norm, attn, ffn_norm, ffn`` for MLA (SPEC 7).
    """

    def __init__(self, cfg: ModelConfig, kind: BlockKind, plan: ComputePlan = REFERENCE_PLAN):
        super().__init__()
        self.kind = kind
        self.names = BLOCK_NAMES[kind]  # (attention norm, MLP norm, MLP)
        attn_norm, mlp_norm, mlp = self.names
        # In this order: it is the state dict's and the initialization's order.
        setattr(self, attn_norm, block_norm(cfg))
        self.attn = ATTENTION[kind](cfg, plan)
        setattr(self, mlp_norm, block_norm(cfg))
        setattr(self, mlp, SwiGLU(cfg, plan))

    def forward(self, x, ropes, positions, cache=None, chunk=None, segment_ids=None):
        """x (B, T, C) -> (B, T, C); ``cache``, ``chunk`` and ``segment_ids`` as the attention
        module takes them."""
        attn_norm, mlp_norm, mlp = (getattr(self, name) for name in self.names)
        x = x + self.attn(attn_norm(x), ropes[self.kind], positions, cache, chunk, segment_ids)
        return x + mlp(mlp_norm(x))


def document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: each token's position in its document, the run of equal ``segment_ids``
    it belongs to (SPEC 3.3)."""
    t = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    first = torch.ones_like(segment_ids, dtype=torch.bool)
    first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return t - torch.cummax(torch.where(first, t, 0), dim=1).values


class SWAMLA(nn.Module):
    """Token ids (B, T) -> logits (B, T, V) and, given targets, the mean loss.

    With ``plan.loss_chunk > 0`` and targets, the loss is computed over chunks of that many
    positions (logits are then not returned: None), as in ``swamla_jax.model``. ``segment_ids``
    (B, T) marks the documents of packed rows: each then attends only within itself, with
    positions and sinks counted from its start (SPEC 3.3).
    """

    def __init__(self, cfg: ModelConfig, plan: ComputePlan = REFERENCE_PLAN):
        super().__init__()
        self.config, self.plan = cfg, plan
        # The trainer checks batches on the host and turns this off to avoid a device sync a step.
        self.check_inputs = True
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, kind, plan) for kind in cfg.block_kinds]),
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

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _ropes(self, positions):
        """RoPE tables of each block kind at ``positions`` (T,) or (B, T)."""
        cfg = self.config
        return {kind: rope_tables(dim, positions, cfg.rope_theta, cfg.rope_factor)
                for kind, dim in ((BlockKind.SWA, cfg.head_dim),
                                  (BlockKind.MLA, cfg.qk_rope_head_dim))}

    def _head(self, x):
        return x @ self.transformer.wte.weight.to(x.dtype).T  # (B, T, V), tied head

    def logits(self, x):
        """Tied-head logits (..., V) in float32 of final hidden states x (..., C)."""
        return self._head(x).float()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None):
        cfg = self.config
        check_input_shapes(idx.shape, None if targets is None else targets.shape, cfg.block_size,
                           None if segment_ids is None else segment_ids.shape)
        B, T = idx.shape
        if self.check_inputs and not torch.compiler.is_compiling():  # a host sync: no graph break
            check_token_ids(idx.detach().cpu().numpy(), cfg.vocab_size)
            if targets is not None:
                check_target_ids(targets.detach().cpu().numpy(), cfg.vocab_size)
        positions = (torch.arange(T, device=idx.device) if segment_ids is None
                     else document_positions(segment_ids))
        ropes = self._ropes(positions)
        remat = self.plan.remat_policy != "none" and self.training
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        for block in self.transformer.h:
            if remat:  # each block's activations recomputed in the backward pass
                x = torch.utils.checkpoint.checkpoint(block, x, ropes, positions, None, None,
                                                      segment_ids, use_reentrant=False)
            else:
                x = block(x, ropes, positions, segment_ids=segment_ids)
        x = self.transformer.ln_f(x)
        chunk = self.plan.loss_chunk
        if targets is not None and chunk and T > chunk:
            return None, chunked_cross_entropy(self.transformer.wte.weight, x, targets,
                                               cfg.label_smoothing, chunk)
        logits = self._head(x)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits, targets, cfg.label_smoothing)
        return logits, loss

    def forward_chunk(self, cache, tokens, start, end):
        """Run ``tokens`` (B, T) at positions ``start_b + t`` against ``cache`` (``init_cache``);
        tokens at positions ``>= end_b`` are padding. Updates the cache in place; returns the
        final-normed hidden states (B, T, C) (:meth:`logits` makes logits of them)."""
        T = tokens.shape[1]
        pos = start[:, None] + torch.arange(T, device=tokens.device)[None, :]  # (B, T)
        chunk = chunk_layout(self.config, cache, pos, start, end, latent_len(cache))
        ropes = self._ropes(pos)
        x = self.transformer.wte(tokens)  # (B, T, C)
        for block, layer in zip(self.transformer.h, cache["layers"], strict=True):
            x = block(x, ropes, pos, layer, chunk)
        finish_chunk_(cache, chunk)
        return self.transformer.ln_f(x)
