"""The SWA-MLA language model in Flax (SPEC.md sections 2, 5 and 6).

Shapes: B batch, T time, C model width, V vocabulary.

The layers are ``n_cycles`` repeats of the block cycle (e.g. SWA SWA MLA) plus a remainder. The
repeats run under ``nn.scan`` with parameters stacked on a leading ``layers`` axis, so compile time
does not grow with depth (as MaxText scans Gemma 3's 5-local + 1-global unit); the remainder is
unrolled. Parameter paths: ``cycles/block_{j}/...`` (stacked) and ``h_{i}/...`` (remainder).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from swamla.config import BlockKind, ModelConfig, check_sequence_length, check_token_ids
from swamla_jax.attention import MLAttention, SWAttention, resolve_attention_impl
from swamla_jax.layers import Dtype, Embed, SwiGLU, block_norm, f32, rope_tables

IGNORE_INDEX = -100

# Remat policies by name (jax.checkpoint_policies): what the backward pass may keep.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """One SWA or MLA block: ``x + Attn(Norm_a(x))`` then ``x + MLP(Norm_m(x))`` (SPEC 2)."""

    cfg: ModelConfig
    kind: BlockKind
    dtype: Dtype = f32
    deterministic: bool = True
    dot_general: Callable | None = None
    attention_impl: str = "reference"

    @nn.compact
    def __call__(self, x, ropes, positions):
        cfg = self.cfg
        sub = dict(cfg=cfg, dtype=self.dtype, deterministic=self.deterministic,
                   dot_general=self.dot_general)
        if self.kind is BlockKind.SWA:
            names, attn, rope = ("norm1", "norm2", "mlp"), SWAttention, ropes[0]
        else:
            names, attn, rope = ("attn_norm", "ffn_norm", "ffn"), MLAttention, ropes[1]
        h = block_norm(cfg, self.dtype, names[0])(x)
        x = x + attn(name="attn", attention_impl=self.attention_impl, **sub)(h, rope, positions)
        h = block_norm(cfg, self.dtype, names[1])(x)
        return x + SwiGLU(name=names[2], **sub)(h)


def _block_class(remat_policy: str, scanned: bool):
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {list(REMAT_POLICIES)}, got {remat_policy!r}")
    if remat_policy == "none":
        return Block
    # Inside scan the loop already stops XLA from CSE-ing the recomputation away.
    return nn.remat(Block, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scanned,
                    static_argnums=())


class Cycle(nn.Module):
    """One repeat of the block pattern; the scan body."""

    cfg: ModelConfig
    dtype: Dtype = f32
    deterministic: bool = True
    remat_policy: str = "none"
    dot_general: Callable | None = None
    attention_impl: str = "reference"
    looped: bool = True  # False when the scan is fully unrolled (no loop keeps CSE away)

    @nn.compact
    def __call__(self, x, ropes, positions):
        block = _block_class(self.remat_policy, scanned=self.looped)
        for j, kind in enumerate(self.cfg.cycle):
            x = block(self.cfg, kind, self.dtype, self.deterministic, self.dot_general,
                      self.attention_impl, name=f"block_{j}")(x, ropes, positions)
        return x, None


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0):
    """Mean token cross entropy over targets != -100 in float32 (SPEC 5).

    With smoothing eps the target class gets weight 1 - eps and every other class eps / (V - 1).
    """
    logp = jax.nn.log_softmax(logits.astype(f32), axis=-1)  # (B, T, V)
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)
    tgt = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    loss = -tgt
    if label_smoothing > 0.0:
        V = logits.shape[-1]
        loss = -(1.0 - label_smoothing) * tgt - (label_smoothing / (V - 1)) * (logp.sum(-1) - tgt)
    loss = jnp.where(valid, loss, 0.0)
    return loss.sum() / jnp.maximum(valid.sum(), 1)


def chunked_cross_entropy(head, x, targets, label_smoothing: float, chunk: int):
    """SPEC 5 loss over sequence chunks: logits of one chunk at a time, recomputed for backward."""
    B, T, C = x.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, C).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    targets = targets.reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_sums(xc, tc):
        logp = jax.nn.log_softmax(head(xc).astype(f32), axis=-1)  # (B, chunk, V)
        valid = tc != IGNORE_INDEX
        tgt = jnp.take_along_axis(logp, jnp.where(valid, tc, 0)[..., None], axis=-1)[..., 0]
        loss = -tgt
        if label_smoothing > 0.0:
            V = logp.shape[-1]
            loss = -(1.0 - label_smoothing) * tgt - (label_smoothing / (V - 1)) * (
                logp.sum(-1) - tgt)
        return jnp.where(valid, loss, 0.0).sum(), valid.sum()

    def body(carry, xs):
        total, count = carry
        s, c = chunk_sums(*xs)
        return (total + s, count + c), None

    (total, count), _ = jax.lax.scan(body, (jnp.zeros([], f32), jnp.zeros([], jnp.int32)),
                                     (x, targets))
    return total / jnp.maximum(count, 1)


class SWAMLA(nn.Module):
    """Token ids (B, T) -> (logits (B, T, V) float32, mean loss or None).

    ``dtype`` is the compute dtype (parameters are always float32); ``deterministic=False`` turns
    on dropout (rng stream ``'dropout'``) and is what training passes. ``dot_general`` replaces
    the block matmuls (FP8: ``swamla_jax.fp8.fp8_dot_general``); ``attention_impl`` picks the
    kernel (``swamla_jax.attention.resolve_attention_impl``). With ``loss_chunk > 0`` and targets,
    the loss is computed over chunks of ``loss_chunk`` positions, each chunk's logits recomputed
    in the backward pass, so float32 logits never exist for the whole batch; logits are then
    not returned (None). ``scan_layers=False`` fully unrolls the loop over cycles (the parameter
    tree is the same).
    """

    cfg: ModelConfig
    dtype: Dtype = f32
    remat_policy: str = "none"
    dot_general: Callable | None = None
    attention_impl: str = "auto"
    loss_chunk: int = 0
    scan_layers: bool = True

    @nn.compact
    def __call__(self, idx, targets=None, *, deterministic: bool = True):
        cfg = self.cfg
        B, T = idx.shape
        check_sequence_length(T, cfg.block_size)
        if not isinstance(idx, jax.core.Tracer):  # under jit the trainer checks on the host
            check_token_ids(idx, cfg.vocab_size)
        positions = jnp.arange(T)
        ropes = (rope_tables(cfg.head_dim, positions, cfg.rope_theta, cfg.rope_factor),
                 rope_tables(cfg.qk_rope_head_dim, positions, cfg.rope_theta, cfg.rope_factor))
        wte = Embed(cfg.vocab_size, cfg.n_embd, cfg.init_std, self.dtype, name="wte")
        x = nn.Dropout(cfg.dropout)(wte(idx), deterministic=deterministic)  # (B, T, C)
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))

        impl = resolve_attention_impl(self.attention_impl, self.dtype, cfg.dropout)
        common = dict(dtype=self.dtype, deterministic=deterministic, dot_general=self.dot_general,
                      attention_impl=impl)
        if cfg.n_cycles:
            scanned = nn.scan(Cycle, variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_cycles,
                              unroll=1 if self.scan_layers else cfg.n_cycles,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, remat_policy=self.remat_policy, looped=self.scan_layers,
                           name="cycles", **common)(
                x, ropes, positions)
        block = _block_class(self.remat_policy, scanned=False)
        for i in range(cfg.n_cycles * len(cfg.cycle), cfg.n_layer):
            x = block(cfg, cfg.block_kinds[i], name=f"h_{i}", **common)(x, ropes, positions)

        x = block_norm(cfg, self.dtype, "ln_f")(x)
        if targets is not None and self.loss_chunk and T > self.loss_chunk:
            return None, chunked_cross_entropy(wte.attend, x, targets, cfg.label_smoothing,
                                               self.loss_chunk)
        logits = wte.attend(x)  # (B, T, V) float32, tied head
        loss = None if targets is None else cross_entropy(logits, targets, cfg.label_smoothing)
        return logits, loss
