"""Optimizers of the JAX trainer: AdamW and Lion (optax), clipping, schedule, decay mask.

``--bf16_moments`` (the seed's "FP8AdamW / FP8Lion": optimizer state memory halved) keeps the
moments in bfloat16, does the arithmetic in float32 and stores back with stochastic rounding:
with round-to-nearest a second moment with beta2 near 1 stops decaying, because ``beta2 * v``
rounds back to ``v`` (0.999 v is within half a bf16 ulp of v).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from swamla.schedule import lr_at


def decay_mask(params):
    """True for matrices (linear kernels), False for the embedding, norms, biases and DyT alpha."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def stochastic_round_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
    """float32 -> bfloat16, rounding up with probability equal to the truncated fraction."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


class Bf16MomentsState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates  # () for Lion
    key: jax.Array


def _store(tree, key):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return treedef.unflatten([stochastic_round_bf16(x, k) for x, k in zip(leaves, keys)])


def scale_by_adam_bf16(b1: float, b2: float, eps: float = 1e-8, seed: int = 0):
    """optax.scale_by_adam with bfloat16 moments stored by stochastic rounding."""

    def init(params):
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.bfloat16), params)
        return Bf16MomentsState(jnp.zeros([], jnp.int32), zeros, zeros, jax.random.key_data(
            jax.random.key(seed)))

    def update(updates, state, params=None):
        del params
        f32 = functools.partial(jax.tree_util.tree_map, lambda x: x.astype(jnp.float32))
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, f32(state.mu), updates)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, f32(state.nu), updates)
        count = state.count + 1
        c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree_util.tree_map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        key, k_mu, k_nu = jax.random.split(jax.random.wrap_key_data(state.key), 3)
        return out, Bf16MomentsState(count, _store(mu, k_mu), _store(nu, k_nu),
                                     jax.random.key_data(key))

    return optax.GradientTransformation(init, update)


def scale_by_lion_bf16(b1: float, b2: float, seed: int = 0):
    """optax.scale_by_lion with a bfloat16 moment stored by stochastic rounding."""

    def init(params):
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.bfloat16), params)
        return Bf16MomentsState(jnp.zeros([], jnp.int32), zeros, (), jax.random.key_data(
            jax.random.key(seed)))

    def update(updates, state, params=None):
        del params
        mu = jax.tree_util.tree_map(lambda m: m.astype(jnp.float32), state.mu)
        out = jax.tree_util.tree_map(lambda m, g: jnp.sign(b1 * m + (1 - b1) * g), mu, updates)
        mu = jax.tree_util.tree_map(lambda m, g: b2 * m + (1 - b2) * g, mu, updates)
        key, k_mu = jax.random.split(jax.random.wrap_key_data(state.key))
        return out, Bf16MomentsState(state.count + 1, _store(mu, k_mu), (),
                                     jax.random.key_data(key))

    return optax.GradientTransformation(init, update)


def build_optimizer(cfg, params) -> optax.GradientTransformation:
    """clip -> AdamW or Lion moments -> decoupled weight decay on matrices -> -lr(step)."""
    schedule = functools.partial(lr_at, cfg=cfg, xp=jnp)
    if cfg.optimizer_type == "adamw":
        moments = (scale_by_adam_bf16(cfg.beta1, cfg.beta2, seed=cfg.seed) if cfg.bf16_moments
                   else optax.scale_by_adam(cfg.beta1, cfg.beta2, eps=1e-8))
    elif cfg.optimizer_type == "lion":
        moments = (scale_by_lion_bf16(cfg.beta1, cfg.beta2, seed=cfg.seed) if cfg.bf16_moments
                   else optax.scale_by_lion(cfg.beta1, cfg.beta2))
    else:
        raise ValueError(f"optimizer_type must be adamw or lion, got {cfg.optimizer_type!r}")
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    chain += [moments, optax.add_decayed_weights(cfg.weight_decay, decay_mask(params)),
              optax.scale_by_learning_rate(schedule)]
    return optax.chain(*chain)


def moments_of(opt_state) -> tuple[optax.Updates, optax.Updates | None, jax.Array]:
    """(first moment, second moment or None, update count) from a build_optimizer state."""
    for s in opt_state:
        if isinstance(s, (optax.ScaleByAdamState, Bf16MomentsState)):
            nu = s.nu if isinstance(s, optax.ScaleByAdamState) or s.nu != () else None
            return s.mu, nu, s.count
        if isinstance(s, optax.ScaleByLionState):
            return s.mu, None, s.count
    raise ValueError("optimizer state holds no AdamW or Lion moments")


def with_moments(opt_state, mu, nu, count):
    """A copy of ``opt_state`` with its moments and count replaced (for imported states)."""
    out = []
    for s in opt_state:
        if isinstance(s, optax.ScaleByAdamState):
            s = s._replace(count=count, mu=mu, nu=nu)
        elif isinstance(s, optax.ScaleByLionState):
            s = s._replace(count=count, mu=mu)
        elif isinstance(s, Bf16MomentsState):
            s = s._replace(count=count, mu=mu, nu=nu if nu is not None else ())
        elif isinstance(s, optax.ScaleByScheduleState):
            s = s._replace(count=count)
        out.append(s)
    return tuple(out)
