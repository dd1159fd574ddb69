"""Per-module parity: each block of SPEC 3-4 on the same weights and inputs in both backends.

Outputs and gradients with respect to the inputs are compared, so a bug is located to a module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import swamla_jax.attention as ja
import swamla_jax.layers as jl
import swamla_torch.attention as ta
import swamla_torch.layers as tl
from swamla.plan import ComputePlan
from parity_helpers import (SEQ, VARIANTS, assert_rel_close, flax_params_from_torch, perturb,
                            tiny_config)

pytestmark = pytest.mark.parity
RTOL = 1e-5


def run_both(t_mod, j_mod, x_np, extra_t=(), extra_j=()):
    """Output and d(sum(out * w))/dx of both modules for the same input."""
    x = torch.from_numpy(x_np).requires_grad_(True)
    t_out = t_mod(x, *extra_t)
    cot = np.random.default_rng(8).standard_normal(t_out.shape).astype(np.float32)
    (t_out * torch.from_numpy(cot)).sum().backward()
    params = flax_params_from_torch(t_mod)

    def f(x):
        return j_mod.apply({"params": params}, x, *extra_j)

    j_out, vjp = jax.vjp(f, jnp.asarray(x_np))
    (j_dx,) = vjp(jnp.asarray(cot))
    return (t_out.detach().numpy(), x.grad.numpy()), (np.asarray(j_out), np.asarray(j_dx))


def inputs(cfg, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal((2, SEQ, cfg.n_embd))).astype(np.float32)


def ropes(cfg, head_dim):
    pos_t, pos_j = torch.arange(SEQ), jnp.arange(SEQ)
    t = tl.rope_tables(head_dim, pos_t, cfg.rope_theta, cfg.rope_factor)
    j = jl.rope_tables(head_dim, pos_j, cfg.rope_theta, cfg.rope_factor)
    return t, j, pos_t, pos_j


# fused: the projections that share an input run as one GEMM (the trainer's default), same params
FUSED = pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])


@pytest.mark.parametrize("variant", ["default", "gqa", "bias", "rope_scaling", "logit_scale"])
@pytest.mark.parametrize("seed", [0, 1])
@FUSED
def test_swa_attention(variant, seed, fused):
    cfg = tiny_config(**VARIANTS[variant])
    t_mod = perturb(ta.SWAttention(cfg), seed).eval()
    rt, rj, pt, pj = ropes(cfg, cfg.head_dim)
    j_mod = ja.SWAttention(cfg, ComputePlan(fuse_projections=fused))
    t, j = run_both(t_mod, j_mod, inputs(cfg, seed), (rt, pt), (rj, pj))
    assert_rel_close(j[0], t[0], RTOL, "SWA output")
    assert_rel_close(j[1], t[1], 10 * RTOL, "SWA input grad")


@pytest.mark.parametrize("variant", ["default", "q_lora", "rmsnorm_latents", "bias",
                                     "rope_scaling"])
@pytest.mark.parametrize("seed", [0, 1])
@FUSED
def test_mla_attention(variant, seed, fused):
    cfg = tiny_config(**VARIANTS[variant])
    t_mod = perturb(ta.MLAttention(cfg), seed).eval()
    rt, rj, pt, pj = ropes(cfg, cfg.qk_rope_head_dim)
    j_mod = ja.MLAttention(cfg, ComputePlan(fuse_projections=fused))
    t, j = run_both(t_mod, j_mod, inputs(cfg, seed), (rt, pt), (rj, pj))
    assert_rel_close(j[0], t[0], RTOL, "MLA output")
    assert_rel_close(j[1], t[1], 10 * RTOL, "MLA input grad")


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu(bias):
    cfg = tiny_config(bias=bias)
    t, j = run_both(perturb(tl.SwiGLU(cfg), 3).eval(), jl.SwiGLU(cfg), inputs(cfg, 3))
    assert_rel_close(j[0], t[0], RTOL, "SwiGLU output")
    assert_rel_close(j[1], t[1], 10 * RTOL, "SwiGLU input grad")


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm", "dyt"])
@pytest.mark.parametrize("scale", [1.0, 0.01])  # small inputs make eps matter
def test_norms(kind, scale):
    cfg = tiny_config()
    C = cfg.n_embd
    t_mod, j_mod = {
        "rmsnorm": (tl.RMSNorm(C, cfg.norm_eps), jl.RMSNorm(cfg.norm_eps)),
        "layernorm": (tl.LayerNorm(C), jl.LayerNorm()),
        "dyt": (tl.DynamicTanh(C, 0.6), jl.DynamicTanh(0.6)),
    }[kind]
    t, j = run_both(perturb(t_mod, 4), j_mod, inputs(cfg, 4, scale))
    assert_rel_close(j[0], t[0], RTOL, f"{kind} output")
    assert_rel_close(j[1], t[1], 10 * RTOL, f"{kind} input grad")


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_rope(factor):
    x = np.random.default_rng(5).standard_normal((2, SEQ, 3, 16)).astype(np.float32)
    pos = np.arange(SEQ)
    t = tl.apply_rope(torch.from_numpy(x), *tl.rope_tables(16, torch.from_numpy(pos), 10000.0, factor))
    j = jl.apply_rope(jnp.asarray(x), *jl.rope_tables(16, jnp.asarray(pos), 10000.0, factor))
    assert_rel_close(j, t.numpy(), RTOL, "RoPE")
