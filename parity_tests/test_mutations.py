"""Mutation checks: the parity suite must FAIL when the math is subtly wrong in one backend.

Each test plants one bug in the JAX backend (window off by one, half-split RoPE, a changed norm
eps) and asserts that the very comparison the parity tests use raises. A suite that passed these
mutants could not tell a correct port from a broken one.
"""

import jax.numpy as jnp
import pytest

import swamla_jax.attention as ja
import swamla_jax.layers as jl
import swamla_jax.model as jm
from parity_helpers import compare_model, jax_fns, tiny_config

pytestmark = pytest.mark.parity


@pytest.fixture(autouse=True)
def fresh_compilation():
    jax_fns.cache_clear()  # compiled functions must see the mutant, and later tests must not
    yield
    jax_fns.cache_clear()


def assert_suite_fails(cfg):
    with pytest.raises(AssertionError):
        compare_model(cfg, seed=0)


@pytest.mark.parametrize("delta", [-1, 1])
def test_window_off_by_one_is_caught(monkeypatch, delta):
    original = ja.visible_mask

    def mutant(T, S, window, sink):
        return original(T, S, None if window is None else window + delta, sink)

    monkeypatch.setattr(ja, "visible_mask", mutant)
    assert_suite_fails(tiny_config())


def test_sink_off_by_one_is_caught(monkeypatch):
    original = ja.visible_mask
    monkeypatch.setattr(ja, "visible_mask",
                        lambda T, S, window, sink: original(T, S, window, sink + 1))
    assert_suite_fails(tiny_config())


def test_half_split_rope_is_caught(monkeypatch):
    def half_split(x, cos, sin):  # the GPT-NeoX / rotate_half layout instead of interleaved pairs
        h = x.shape[-1] // 2
        x0, x1 = x[..., :h].astype(jnp.float32), x[..., h:].astype(jnp.float32)
        c, s = cos[:, None, :], sin[:, None, :]
        return jnp.concatenate((x0 * c - x1 * s, x0 * s + x1 * c), -1).astype(x.dtype)

    monkeypatch.setattr(ja, "apply_rope", half_split)
    assert_suite_fails(tiny_config())


def test_rmsnorm_eps_change_is_caught(monkeypatch):
    original = jm.block_norm

    def mutant(cfg, plan, name=None):
        return original(cfg.replace(norm_eps=cfg.norm_eps * 10), plan, name)

    monkeypatch.setattr(jm, "block_norm", mutant)
    assert_suite_fails(tiny_config())


def test_layernorm_eps_change_is_caught(monkeypatch):
    monkeypatch.setattr(ja, "latent_norm",
                        lambda cfg, plan, name=None: jl.LayerNorm(eps=1e-6, plan=plan, name=name))
    assert_suite_fails(tiny_config(mla_norm="layernorm"))


def test_unmutated_suite_passes():
    compare_model(tiny_config(), seed=0)
