"""The SWA-MLA language model in Flax (SPEC.md sections 2, 5 and 6).

Shapes: B batch, T time, C model width, V vocabulary.

The layers are ``n_cycles`` repeats of the block cycle (e.g. SWA SWA MLA) plus a remainder. The
repeats run under ``nn.scan`` with parameters stacked on a leading ``layers`` axis (as MaxText
scans Gemma 3's 5-local + 1-global unit); the remainder is unrolled. By default the scan is fully
unrolled (``scan_layers=False``): on an H100 the looped form spent ~15% of the step copying layer
slices in and out of the stacked buffers; ``scan_layers=True`` keeps the loop, whose compile time
does not grow with depth. Parameter paths: ``cycles/block_{j}/...`` (stacked) and ``h_{i}/...``
(remainder), the same either way.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from swamla.config import (BlockKind, ModelConfig, check_sequence_length, check_target_ids,
                           check_token_ids)
from swamla_jax.attention import MLAttention, SWAttention, resolve_attention_impl
from swamla_jax.layers import (Dtype, Embed, SwiGLU, block_norm, f32, resolve_mlp_impl,
                               rope_tables)

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
    fuse_projections: bool = False
    mlp_impl: str = "xla"

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
        x = x + attn(name="attn", attention_impl=self.attention_impl,
                     fuse_projections=self.fuse_projections, **sub)(h, rope, positions)
        h = block_norm(cfg, self.dtype, names[1])(x)
        return x + SwiGLU(name=names[2], impl=self.mlp_impl, **sub)(h)


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
    fuse_projections: bool = False
    mlp_impl: str = "xla"
    looped: bool = True  # False when the scan is fully unrolled (no loop keeps CSE away)

    @nn.compact
    def __call__(self, x, ropes, positions):
        block = _block_class(self.remat_policy, scanned=self.looped)
        for j, kind in enumerate(self.cfg.cycle):
            x = block(self.cfg, kind, self.dtype, self.deterministic, self.dot_general,
                      self.attention_impl, self.fuse_projections, self.mlp_impl,
                      name=f"block_{j}")(
                x, ropes, positions)
        return x, None


def _token_losses(logits, lse, targets, label_smoothing: float):
    """SPEC 5 loss of each position from float32 logits (..., V) and their log-sum-exp (...),
    0 where the target is -100: ``-(1-e) log p_t - e/(V-1) sum_{j != t} log p_j``."""
    valid = targets != IGNORE_INDEX
    tgt = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    loss = lse - tgt  # -log p(target)
    if label_smoothing > 0.0:
        V = logits.shape[-1]
        loss = lse - (1.0 - label_smoothing) * tgt - (label_smoothing / (V - 1)) * (
            logits.sum(-1) - tgt)
    return jnp.where(valid, loss, 0.0)


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0):
    """Mean token cross entropy over targets != -100 in float32 (SPEC 5).

    With smoothing eps the target class gets weight 1 - eps and every other class eps / (V - 1).
    """
    logits = logits.astype(f32)
    loss = _token_losses(logits, jax.nn.logsumexp(logits, axis=-1), targets, label_smoothing)
    return loss.sum() / jnp.maximum((targets != IGNORE_INDEX).sum(), 1)


def _split_chunks(a, chunk: int, fill):
    """(B, T, ...) -> (n, B, chunk, ...) padded with ``fill`` to a whole number of chunks."""
    B, T = a.shape[:2]
    n = -(-T // chunk)
    pad = [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (a.ndim - 2)
    a = jnp.pad(a, pad, constant_values=fill)
    return a.reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)


def _chunk_logits(xc, emb):
    """Tied-head logits of one chunk: compute-dtype operands, float32 products (SPEC 5)."""
    return jnp.einsum("BTC,VC->BTV", xc, emb, preferred_element_type=f32)


def _lse_combine(a, b):
    """Merge two (running max, sum of exp(x - max)) pairs, one exponential per merge."""
    (ma, sa), (mb, sb) = a, b
    e = jnp.where(ma == mb, 1.0, jnp.exp(-jnp.abs(ma - mb)))  # == also covers -inf with -inf
    return jnp.maximum(ma, mb), jnp.where(ma >= mb, sa + sb * e, sb + sa * e)


def _chunk_lse(logits):
    """Log-sum-exp over the last axis in one pass over the float32 logits (an online softmax
    normalizer as one variadic reduction) rather than a max pass and then a sum pass."""
    init = (jnp.array(-jnp.inf, f32), jnp.array(0.0, f32))
    m, s = jax.lax.reduce((logits, jnp.ones_like(logits)), init, _lse_combine, (logits.ndim - 1,))
    return m + jnp.log(s)


def _chunk_loss(xc, emb, tc, label_smoothing):
    """One chunk's summed loss, with its float32 logits (B, chunk, V) and their log-sum-exp."""
    logits = _chunk_logits(xc, emb)
    lse = _chunk_lse(logits)
    return _token_losses(logits, lse, tc, label_smoothing).sum(), logits, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_loss_sum(xs, emb, ts, label_smoothing: float):
    """Summed SPEC 5 loss of the tied head over targets != -100; xs (n, B, chunk, C) and ts
    (n, B, chunk) are the positions split into n chunks, taken one at a time."""
    def body(total, xs_):
        xc, tc = xs_
        return total + _chunk_loss(xc, emb, tc, label_smoothing)[0], None

    return jax.lax.scan(body, jnp.zeros([], f32), (xs, ts))[0]


def _head_loss_fwd(xs, emb, ts, label_smoothing):
    """The loss and, in the same pass over each chunk's logits, its gradients.

    The loss is a sum, so its VJP for a cotangent ``g`` is ``g`` times the gradient for 1: the
    backward pass only scales what this computes, and each chunk's logits are made once per step
    instead of again in the backward pass (one head GEMM fewer). d(loss sum)/d logits = softmax -
    smoothed one-hot is rounded to the compute dtype (as the autocast PyTorch head does) so both
    head-gradient GEMMs run in bf16 with float32 accumulation; the gradients are kept in float32
    until scaled.
    """
    V = emb.shape[0]
    on, off = 1.0 - label_smoothing, label_smoothing / (V - 1)

    def body(carry, xs_):
        total, d_emb = carry
        xc, tc = xs_
        loss, logits, lse = _chunk_loss(xc, emb, tc, label_smoothing)
        total = total + loss
        valid = (tc != IGNORE_INDEX)[..., None]
        target = jnp.arange(V) == tc[..., None]
        d_logits = jnp.exp(logits - lse[..., None]) - jnp.where(target, on, off)
        d_logits = jnp.where(valid, d_logits, 0.0).astype(xc.dtype)  # (B, chunk, V)
        dxc = jnp.einsum("BTV,VC->BTC", d_logits, emb, preferred_element_type=f32)
        d_emb = d_emb + jnp.einsum("BTV,BTC->VC", d_logits, xc, preferred_element_type=f32)
        return (total, d_emb), dxc

    (total, d_emb), dxs = jax.lax.scan(body, (jnp.zeros([], f32), jnp.zeros(emb.shape, f32)),
                                       (xs, ts))
    dtypes = (jnp.zeros(0, xs.dtype), jnp.zeros(0, emb.dtype))  # the cotangents' dtypes
    return total, (dxs, d_emb, dtypes)


def _head_loss_bwd(label_smoothing, res, g):
    dxs, d_emb, (xs_dtype, emb_dtype) = res
    return (g * dxs).astype(xs_dtype.dtype), (g * d_emb).astype(emb_dtype.dtype), None


_head_loss_sum.defvjp(_head_loss_fwd, _head_loss_bwd)


def chunked_cross_entropy(x, embedding, targets, label_smoothing: float, chunk: int):
    """SPEC 5 mean loss through the tied head over chunks of ``chunk`` positions.

    ``x`` (B, T, C) and ``embedding`` (V, C) in the compute dtype. Float32 logits exist for one
    chunk at a time. Under differentiation the forward pass also computes the gradients from
    each chunk's logits (``_head_loss_fwd``), so they are made once a step, never stored.
    """
    xs, ts = _split_chunks(x, chunk, 0), _split_chunks(targets, chunk, IGNORE_INDEX)
    total = _head_loss_sum(xs, embedding, ts, label_smoothing)
    count = (targets != IGNORE_INDEX).sum()
    return total / jnp.maximum(count, 1)


class SWAMLA(nn.Module):
    """Token ids (B, T) -> (logits (B, T, V) float32, mean loss or None).

    ``dtype`` is the compute dtype (parameters are always float32); ``deterministic=False`` turns
    on dropout (rng stream ``'dropout'``) and is what training passes. ``dot_general`` replaces
    the block matmuls (FP8: ``swamla_jax.fp8.fp8_dot_general``); ``attention_impl`` picks the
    kernel (``swamla_jax.attention.resolve_attention_impl``). With ``loss_chunk > 0`` and targets,
    the loss is computed over chunks of ``loss_chunk`` positions, with its gradients in the same
    pass, so float32 logits never exist for the whole batch; logits are then
    not returned (None). ``scan_layers=False`` fully unrolls the loop over cycles (the parameter
    tree is the same). ``fuse_projections`` runs the projections that share an input (SWA q/k/v,
    MLA query and kv down-projection) as one GEMM each (same parameters; not under tensor
    parallelism, see ``layers.fused_projections``). ``mlp_impl`` picks SwiGLU's backward
    kernel (``swamla_jax.layers.resolve_mlp_impl``).
    """

    cfg: ModelConfig
    dtype: Dtype = f32
    remat_policy: str = "none"
    dot_general: Callable | None = None
    attention_impl: str = "auto"
    loss_chunk: int = 0
    scan_layers: bool = False
    fuse_projections: bool = True
    mlp_impl: str = "auto"

    @nn.compact
    def __call__(self, idx, targets=None, *, deterministic: bool = True):
        cfg = self.cfg
        B, T = idx.shape
        check_sequence_length(T, cfg.block_size)
        if not isinstance(idx, jax.core.Tracer):  # under jit the trainer checks on the host
            check_token_ids(idx, cfg.vocab_size)
        if targets is not None and not isinstance(targets, jax.core.Tracer):
            check_target_ids(targets, cfg.vocab_size)
        positions = jnp.arange(T)
        ropes = (rope_tables(cfg.head_dim, positions, cfg.rope_theta, cfg.rope_factor),
                 rope_tables(cfg.qk_rope_head_dim, positions, cfg.rope_theta, cfg.rope_factor))
        wte = Embed(cfg.vocab_size, cfg.n_embd, cfg.init_std, self.dtype, name="wte")
        x = nn.Dropout(cfg.dropout)(wte(idx), deterministic=deterministic)  # (B, T, C)
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))

        impl = resolve_attention_impl(self.attention_impl, self.dtype, cfg.dropout)
        common = dict(dtype=self.dtype, deterministic=deterministic, dot_general=self.dot_general,
                      attention_impl=impl, fuse_projections=self.fuse_projections,
                      mlp_impl=resolve_mlp_impl(self.mlp_impl, self.dtype, self.dot_general))
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
            return None, chunked_cross_entropy(x, wte.embedding.astype(self.dtype), targets,
                                               cfg.label_smoothing, self.loss_chunk)
        logits = wte.attend(x)  # (B, T, V) float32, tied head
        loss = None if targets is None else cross_entropy(logits, targets, cfg.label_smoothing)
        return logits, loss
