"""The SWA-MLA language model in Flax (SPEC.md sections 2, 5 and 6), training and cached forms.

Shapes: B batch, T time, C model width, V vocabulary, L blocks per cycle.

The layers are ``n_cycles`` repeats of the block cycle (e.g. SWA SWA MLA) plus a remainder. The
repeats run under ``nn.scan`` with parameters stacked on a leading ``layers`` axis (as MaxText
scans Gemma 3's 5-local + 1-global unit); the remainder is unrolled. Unless ``plan.scan_layers``,
the scan is fully unrolled: the looped form copies layer slices in and out of the stacked
buffers, ~15% of the step on an H100, but its compile time does not grow with depth. Parameter
paths: ``cycles/block_{j}/...`` (stacked) and ``h_{i}/...`` (remainder), the same either way.

:func:`forward_chunk` runs the same blocks over a chunk of new tokens against the KV cache
(``swamla_jax.cache``), layer by layer, each with its own buffers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from swamla.config import (BlockKind, ModelConfig, check_input_shapes, check_target_ids,
                           check_token_ids)
from swamla.layout import BLOCK_NAMES, layer_location
from swamla.plan import ComputePlan, REFERENCE_PLAN
from swamla_jax.attention import MLAttention, SWAttention
from swamla_jax.cache import chunk_layout, latent_len
from swamla_jax.layers import (Embed, SwiGLU, block_norm, compute_dtype,
                               rope_tables)
from swamla_jax.losses import chunked_cross_entropy, cross_entropy

ATTENTION = {BlockKind.SWA: SWAttention, BlockKind.MLA: MLAttention}

# Remat policies by name (jax.checkpoint_policies): what the backward pass may keep.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """``x + Attn(Norm_a(x))``, then ``+ MLP(Norm_m(x))`` (SPEC 2), for either block kind.

    The sub-modules carry each kind's portable names (``swamla.layout.BLOCK_NAMES``): ``norm1,
    attn, norm2, mlp`` for SWA, ``attn_norm, attn, ffn_norm, ffn`` for MLA (SPEC 7).
    """

    cfg: ModelConfig
    kind: BlockKind
    plan: ComputePlan = REFERENCE_PLAN
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, ropes, positions, cache=None, chunk=None, segment_ids=None):
        """x (B, T, C) -> (B, T, C); with this layer's ``cache`` (and the ``chunk`` layout),
        -> (x, updated cache), as the attention module takes and returns them. ``segment_ids``
        (B, T): packed documents kept apart (SPEC 3.3)."""
        cfg, plan = self.cfg, self.plan
        attn_norm, mlp_norm, mlp = BLOCK_NAMES[self.kind]
        attn = ATTENTION[self.kind](cfg, plan, self.deterministic, name="attn")
        y = attn(block_norm(cfg, plan, attn_norm)(x), ropes[self.kind.value], positions, cache,
                 chunk, segment_ids)
        if cache is not None:
            y, cache = y
        x = x + y
        x = x + SwiGLU(cfg, plan, self.deterministic, name=mlp)(block_norm(cfg, plan, mlp_norm)(x))
        return x if cache is None else (x, cache)


def _block_class(plan: ComputePlan, looped: bool):
    if plan.remat_policy == "none":
        return Block
    # Inside a looped scan the loop already stops XLA from CSE-ing the recomputation away.
    return nn.remat(Block, policy=REMAT_POLICIES[plan.remat_policy], prevent_cse=not looped,
                    static_argnums=())


class Cycle(nn.Module):
    """One repeat of the block pattern; the scan body."""

    cfg: ModelConfig
    plan: ComputePlan = REFERENCE_PLAN
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, ropes, positions, segment_ids):
        block = _block_class(self.plan, looped=self.plan.scan_layers)
        for j, kind in enumerate(self.cfg.cycle):
            x = block(self.cfg, kind, self.plan, self.deterministic, name=f"block_{j}")(
                x, ropes, positions, None, None, segment_ids)
        return x, None


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """(B, T) int32: each token's position in its document, the run of equal ``segment_ids``
    it belongs to (SPEC 3.3)."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(first, t, 0), axis=1)


def rope_by_kind(cfg: ModelConfig, positions) -> dict:
    """RoPE cos/sin tables of each block kind (by ``BlockKind.value``) at ``positions``."""
    return {BlockKind.SWA.value: rope_tables(cfg.head_dim, positions, cfg.rope_theta,
                                             cfg.rope_factor),
            BlockKind.MLA.value: rope_tables(cfg.qk_rope_head_dim, positions, cfg.rope_theta,
                                             cfg.rope_factor)}


class SWAMLA(nn.Module):
    """Token ids (B, T) -> (logits (B, T, V) float32, mean loss or None).

    ``plan`` holds every kernel and precision choice (``swamla.plan.resolve_plan``); parameters
    are always float32. ``deterministic=False`` turns on dropout (rng stream ``'dropout'``) and
    is what training passes. ``segment_ids`` (B, T) marks the documents of packed rows: each then
    attends only within itself, with positions and sinks counted from its start (SPEC 3.3). With
    ``plan.loss_chunk > 0`` and targets, the loss is computed over
    chunks of that many positions, with its gradients in the same pass, so float32 logits never
    exist for the whole batch; logits are then not returned (None).
    """

    cfg: ModelConfig
    plan: ComputePlan = REFERENCE_PLAN

    @nn.compact
    def __call__(self, idx, targets=None, *, segment_ids=None, deterministic: bool = True):
        cfg, plan = self.cfg, self.plan
        check_input_shapes(idx.shape, None if targets is None else targets.shape, cfg.block_size,
                           None if segment_ids is None else segment_ids.shape)
        B, T = idx.shape
        if not isinstance(idx, jax.core.Tracer):  # under jit the trainer checks on the host
            check_token_ids(idx, cfg.vocab_size)
        if targets is not None and not isinstance(targets, jax.core.Tracer):
            check_target_ids(targets, cfg.vocab_size)
        positions = jnp.arange(T) if segment_ids is None else document_positions(segment_ids)
        ropes = rope_by_kind(cfg, positions)
        wte = Embed(cfg, plan, name="wte")
        x = nn.Dropout(cfg.dropout)(wte(idx), deterministic=deterministic)  # (B, T, C)
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))

        if cfg.n_cycles:
            scanned = nn.scan(Cycle, variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * 3, length=cfg.n_cycles,
                              unroll=1 if plan.scan_layers else cfg.n_cycles,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, plan, deterministic, name="cycles")(x, ropes, positions,
                                                                    segment_ids)
        block = _block_class(plan, looped=False)
        for i in range(cfg.n_cycles * len(cfg.cycle), cfg.n_layer):
            x = block(cfg, cfg.block_kinds[i], plan, deterministic, name=f"h_{i}")(
                x, ropes, positions, None, None, segment_ids)

        x = block_norm(cfg, plan, "ln_f")(x)
        if targets is not None and plan.loss_chunk and T > plan.loss_chunk:
            return None, chunked_cross_entropy(x, wte.embedding.astype(compute_dtype(plan)),
                                               targets, cfg.label_smoothing, plan.loss_chunk)
        logits = wte.attend(x)  # (B, T, V) float32, tied head
        loss = None if targets is None else cross_entropy(logits, targets, cfg.label_smoothing)
        return logits, loss


# ------------------------------------------------------------------------------- cached forward
def forward_chunk(cfg: ModelConfig, plan: ComputePlan, params, cache, tokens, start, end):
    """Run ``tokens`` (B, T) at positions ``start_b + t`` through the model against ``cache``
    (``swamla_jax.cache.init_cache``); tokens at positions ``>= end_b`` are padding: neither
    stored in the SWA buffers nor seen by real queries (MLA slots they touch are overwritten
    before any real query reads them).

    Returns (final-normed hidden states (B, T, C), updated cache); :func:`logits` makes logits
    of them. The layers are unrolled, so every layer's cache is its own buffer and a new token
    is written into it in place.
    """
    T = tokens.shape[1]
    pos = start[:, None] + jnp.arange(T, dtype=start.dtype)[None, :]  # (B, T)
    chunk = chunk_layout(cfg, cache, pos, start, end, latent_len(cache))
    ropes = rope_by_kind(cfg, pos)
    x = Embed(cfg, plan).apply({"params": params["wte"]}, tokens)  # (B, T, C)
    layers = {}
    for i, kind in enumerate(cfg.block_kinds):
        x, layers[f"h_{i}"] = Block(cfg, kind, plan).apply(
            {"params": layer_params(cfg, params, i)}, x, ropes, pos, cache["layers"][f"h_{i}"],
            chunk)
    x = block_norm(cfg, plan).apply({"params": params["ln_f"]}, x)
    return x, {"layers": layers, "swa_pos": chunk["swa_pos"]}


def layer_params(cfg: ModelConfig, params, i: int):
    """Layer i's parameters: a row of the stacked ``cycles/block_{i % L}``, or ``h_i``."""
    path, row = layer_location(cfg, i)
    if row is None:
        return params[path]
    group, block = path.split("/")
    return jax.tree_util.tree_map(lambda a: a[row], params[group][block])


def logits(cfg: ModelConfig, plan: ComputePlan, params, x):
    """Tied-head logits (float32) of final hidden states x (B, C) or (B, T, C)."""
    squeeze = x.ndim == 2
    out = Embed(cfg, plan).apply({"params": params["wte"]}, x[:, None] if squeeze else x,
                                 method="attend")
    return out[:, 0] if squeeze else out
