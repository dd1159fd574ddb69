"""Shared helpers for the JAX-vs-PyTorch parity suite.

Every comparison runs in float32 with matmul precision pinned to highest on both sides, on weights
ported from one backend to the other (never two random inits), and with every parameter perturbed
away from its init so biases, norm weights and DyT alphas are exercised too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import swamla_jax as sj  # noqa: E402
import swamla_torch as st  # noqa: E402
from swamla.config import load_preset  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_float32_matmul_precision("highest")

SEQ = 80  # longer than the tiny preset's swa_window (32), so the window and the sink both matter
LOGIT_RTOL = 1e-5
GRAD_RTOL = 1e-4
GRAD_FLOOR = 1e-3

# Each variant covers one SPEC option; n_layer 7 gives 2 scanned cycles plus an unrolled layer.
VARIANTS = {
    "default": {},
    "q_lora": {"q_lora_rank": 24},
    "rmsnorm_latents": {"mla_norm": "rmsnorm", "q_lora_rank": 24},
    "dyt": {"use_dyt": True, "dyt_alpha_init": 0.7},
    "gqa": {"ratio_kv": 2},
    "bias": {"bias": True},
    "rope_scaling": {"rope_scaling": {"type": "linear", "factor": 4.0}},
    "logit_scale": {"logit_scale_base": 3.0, "logit_scale_window": 16,
                    "logit_scale_offset": 2, "logit_scale_max": 1.8},
    "label_smoothing": {"label_smoothing": 0.1},
    "cycle_1_2": {"swa_layers_per_cycle": 1, "mla_layers_per_cycle": 2, "swa_sink_size": 0},
}


def tiny_config(**overrides):
    return load_preset("tiny", **{"n_layer": 7, **overrides})


def perturbed_torch_model(cfg, seed: int):
    """A torch model whose every parameter is moved off its init, deterministically per seed."""
    return perturb(st.from_config(cfg, seed=seed), 1000 + seed).eval()


def port_to_jax(model) -> sj.Model:
    """Torch model -> portable tensors -> Flax params (the converter under test)."""
    cfg = model.config
    module = sj.SWAMLA(cfg)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return sj.Model(module, sj.from_portable_tensors(cfg, tensors, sj.abstract_params(module)))


def random_batch(cfg, seed: int, T: int = SEQ, B: int = 2, ignore_some: bool = True):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64)
    targets = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64)
    if ignore_some:
        targets[:, :3] = -100
    return idx, targets


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the tolerance measure of the Core issue."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def assert_rel_close(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def torch_grads(model, idx, targets, train=False):
    model.zero_grad()
    model.train(train)
    _, loss = model(torch.from_numpy(idx), torch.from_numpy(targets))
    loss.backward()
    model.eval()
    return float(loss.detach()), {k: p.grad.numpy().copy() for k, p in model.named_parameters()}


@functools.lru_cache(maxsize=None)
def jax_fns(cfg, train: bool):
    """Jitted forward and value-and-grad for a config, compiled once per (config, mode), with
    the projections fused as the trainer runs them (test_module_parity checks both forms)."""
    module = sj.SWAMLA(cfg, sj.ComputePlan(fuse_projections=True))

    def forward(params, idx, targets):
        return module.apply({"params": params}, idx, targets, deterministic=not train)

    grad = jax.value_and_grad(lambda p, i, t: forward(p, i, t)[1])
    return jax.jit(forward), jax.jit(grad)


def jax_grads(jm: sj.Model, idx, targets, train=False):
    loss, grads = jax_fns(jm.config, train)[1](jm.params, idx, targets)
    return float(loss), sj.to_portable_tensors(jm.config, grads)


def compare_model(cfg, seed: int, train: bool = False):
    """Logits, loss and every gradient of both backends on ported weights; raises on mismatch."""
    tm = perturbed_torch_model(cfg, seed)
    jm = port_to_jax(tm)
    idx, targets = random_batch(cfg, seed)
    tm.train(train)
    with torch.no_grad():
        t_logits, t_loss = tm(torch.from_numpy(idx), torch.from_numpy(targets))
    tm.eval()
    j_logits, j_loss = jax_fns(cfg, train)[0](jm.params, idx, targets)
    assert_rel_close(j_logits, t_logits.numpy(), LOGIT_RTOL, "logits")
    assert abs(float(j_loss) - float(t_loss)) <= LOGIT_RTOL * abs(float(t_loss)), "loss"
    _, tg = torch_grads(tm, idx, targets, train)
    _, jg = jax_grads(jm, idx, targets, train)
    assert set(tg) == set(jg)
    assert_grads_close(jg, tg)


def assert_grads_close(actual: dict, expected: dict, tol: float = GRAD_RTOL):
    """Each gradient tensor within ``tol`` of max |g| of that tensor.

    A scalar gradient that nearly cancels (a DyT alpha summed over B*T*C terms, say 3e-6 when its
    neighbours are 1e-3) carries float32 rounding of ~1e-4 relative in *either* backend against a
    float64 reference, so the denominator never drops below GRAD_FLOOR times the largest gradient
    of the model: an absolute tolerance on the model's own gradient scale.
    """
    scale = max(float(np.abs(g).max()) for g in expected.values())
    for name, g in expected.items():
        denom = max(float(np.abs(g).max()), GRAD_FLOOR * scale)
        err = float(np.abs(np.asarray(actual[name], np.float64) - g).max()) / denom
        assert err <= tol, f"grad of {name}: relative error {err:.3e} > {tol:.0e}"


def flax_params_from_torch(module: torch.nn.Module) -> dict:
    """A torch submodule's state dict as Flax params: 2-D ``weight`` -> transposed ``kernel``."""
    params: dict = {}
    for name, value in module.state_dict().items():
        *path, leaf = name.split(".")
        value = value.detach().numpy()
        if leaf == "weight" and value.ndim == 2:
            leaf, value = "kernel", value.T
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return params


def perturb(module: torch.nn.Module, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module
