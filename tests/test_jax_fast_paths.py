"""The JAX speed paths against the reference: chunked loss, the SWA window+sink merge and its
LSE gradient, FP8 matmuls. CPU tests check the math; GPU tests (skipped without a GPU) check the
real cuDNN kernels and the FP8 GEMMs in the compiled HLO.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swamla_jax as sj
from swamla.config import load_preset
from swamla.plan import ComputePlan, resolve_plan
from swamla_jax.attention import attention, visible_mask
from swamla_jax.kernels import attention as cudnn
from swamla_jax.kernels import fp8

ROOT = Path(__file__).resolve().parent.parent
on_gpu = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not on_gpu, reason="needs a CUDA GPU")


def auto_plan(**choices):
    """The plan the trainer resolves on this device for ``choices``, projections fused (its
    default)."""
    return resolve_plan("jax", on_gpu=on_gpu, fuse_projections=True, **choices)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------- chunked loss
@pytest.mark.parametrize("chunk,smoothing", [(16, 0.0), (24, 0.1)])
def test_chunked_loss_matches_full(chunk, smoothing):
    cfg = load_preset("tiny", n_layer=3, label_smoothing=smoothing)
    full = sj.SWAMLA(cfg, auto_plan())
    chunked = sj.SWAMLA(cfg, auto_plan(loss_chunk=chunk))
    params = sj.from_config(cfg, seed=0).params
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, (2, 70))
    targets = rng.integers(0, cfg.vocab_size, (2, 70))
    targets[0, 5:9] = -100

    def loss(module):
        return lambda p: module.apply({"params": p}, idx, targets)[1]

    with jax.default_matmul_precision("highest"):
        (l_full, g_full), (l_chunk, g_chunk) = (jax.value_and_grad(loss(m))(params)
                                                for m in (full, chunked))
        assert chunked.apply({"params": params}, idx, targets)[0] is None  # no full logits
    assert abs(float(l_full) - float(l_chunk)) <= 1e-6 * float(l_full)
    for a, b in zip(jax.tree_util.tree_leaves(g_chunk), jax.tree_util.tree_leaves(g_full)):
        assert rel(a, b) < 1e-5


def test_one_pass_logsumexp_matches_logsumexp():
    from swamla_jax.losses import _chunk_lse
    x = np.random.default_rng(0).normal(size=(3, 4, 999)).astype(np.float32) * 40
    x[0, 0] = -np.inf  # a row with nothing visible
    x[0, 1, :500] = -np.inf
    x[1, 2, 7] = 3e4  # one logit far above the rest
    np.testing.assert_allclose(_chunk_lse(jnp.asarray(x)), jax.nn.logsumexp(x, axis=-1),
                               rtol=1e-6)


def test_chunked_loss_makes_each_chunks_logits_once():
    """Under differentiation the head runs three vocab-sized GEMMs a chunk (the logits, and the
    two gradients from them in the same pass), not a fourth to recompute the logits; without
    differentiation only the logits GEMM runs."""
    from swamla_jax.losses import chunked_cross_entropy
    V, C = 97, 8
    x = jnp.ones((2, 40, C), jnp.bfloat16)
    emb = jnp.ones((V, C), jnp.bfloat16)
    targets = jnp.zeros((2, 40), jnp.int32)

    def vocab_gemms(f, *args):
        text = jax.jit(f).lower(*args).as_text()
        return sum(1 for line in text.splitlines() if "dot_general" in line and f"{V}x" in line)

    def loss(x, emb):
        return chunked_cross_entropy(x, emb, targets, 0.0, 16)

    assert vocab_gemms(jax.grad(loss, argnums=(0, 1)), x, emb) == 3
    assert vocab_gemms(loss, x, emb) == 1


# ---------------------------------------------------------------------------- SWA merge
def _window_scores(q, k, scale, window):
    """Scaled scores (B, K, G, T, T) of causal attention over the last ``window`` keys."""
    B, T, N, D = q.shape
    K = k.shape[2]
    s = jnp.einsum("BTKGD,BSKD->BKGTS", q.reshape(B, T, K, N // K, D), k) * scale
    return jnp.where(visible_mask(T, T, window, 0), s, -jnp.inf)


def _exact_window(q, k, v, scale, window, return_lse):
    """What cuDNN's sliding window computes, in float32: (out, lse (B, N, T))."""
    B, T, N, _ = q.shape
    s = _window_scores(q, k, scale, window)
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("BKGTS,BSKV->BTKGV", jnp.exp(s - lse[..., None]), v)
    out = out.reshape(B, T, N, v.shape[-1])
    return (out, jax.lax.stop_gradient(lse.reshape(B, N, T))) if return_lse else out


def _flash_bwd(s, q, k, v, out, lse, d_out, scale):
    """Flash attention's backward for the keys behind the scores ``s`` (B, K, G, T, S), -inf where
    masked, given the saved statistics of the whole attention (its output and LSE): with
    ``P = exp(s - lse)`` and ``dS = P (dO . v - sum(dO * out))``, (dq, dk, dv) in float32."""
    B, T, N, D = q.shape
    K = k.shape[2]
    p = jnp.exp(s - lse.reshape(B, K, N // K, T)[..., None])
    do = d_out.reshape(B, T, K, N // K, -1)
    row = jnp.einsum("BTKGD,BTKGD->BKGT", do, out.reshape(do.shape))
    ds = p * (jnp.einsum("BTKGD,BSKD->BKGTS", do, v) - row[..., None]) * scale
    dq = jnp.einsum("BKGTS,BSKD->BTKGD", ds, k).reshape(B, T, N, D)
    dk = jnp.einsum("BKGTS,BTKGD->BSKD", ds, q.reshape(B, T, K, N // K, D))
    dv = jnp.einsum("BKGTS,BTKGD->BSKD", p, do)
    return dq, dk, dv


def _exact_window_bwd(q, k, v, out, lse, d_out, scale, window):
    """cuDNN's window backward given the saved statistics, in float32."""
    return _flash_bwd(_window_scores(q, k, scale, window), q, k, v, out, lse, d_out, scale)


def _inputs(kv_heads, T=33, seed=1):
    rng = np.random.default_rng(seed)
    q, cot = (jnp.asarray(rng.standard_normal((2, T, 4, 8)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((2, T, kv_heads, 8)), jnp.float32) for _ in range(2))
    return q, k, v, cot


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flash_bwd_stand_in_is_the_gradient(kv_heads):
    """The flash backward from saved (output, LSE), which stands in for cuDNN's below, equals
    autodiff of the attention itself."""
    q, k, v, cot = _inputs(kv_heads)
    with jax.default_matmul_precision("highest"):
        out, lse = _exact_window(q, k, v, 0.3, 8, True)
        got = _exact_window_bwd(q, k, v, out, lse, cot, 0.3, 8)
        want = jax.grad(lambda q, k, v: jnp.sum(_exact_window(q, k, v, 0.3, 8, False) * cot),
                        argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        assert rel(a, b) < 1e-5, name


@pytest.mark.parametrize("window,sink,kv_heads", [(8, 4, 4), (8, 4, 2), (5, 1, 4), (40, 4, 4)])
def test_swa_sink_merge_and_its_split_gradient(monkeypatch, window, sink, kv_heads):
    """The window+sink merge and its backward (the window part's backward run with the merged
    statistics, the sink part's in JAX), with cuDNN's forward and backward stood in for by exact
    float32 window attention."""
    monkeypatch.setattr(cudnn, "_cudnn_call", _exact_window)
    monkeypatch.setattr(cudnn, "_cudnn_window_bwd", _exact_window_bwd)
    q, k, v, cot = _inputs(kv_heads)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    fast = lambda q, k, v: cudnn.swa_sink_attention(  # noqa: E731
        q, k, v, scale=0.3, window=window, sink=sink)
    ref = lambda q, k, v: attention(q, k, v, scale=0.3, window=window, sink=sink)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        assert rel(fast(q, k, v), ref(q, k, v)) < 1e-5
        g_fast = jax.grad(loss(fast), argnums=(0, 1, 2))(q, k, v)
        g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_fast, g_ref):
        assert rel(a, b) < 1e-5, name


def test_a_jax_without_the_cudnn_backward_rule_gets_a_clear_error(monkeypatch):
    """The split backward calls a private JAX function; a JAX without it says so and what to do."""
    class NoRule:
        pass

    monkeypatch.setattr(cudnn, "_cudnn", lambda: NoRule())
    q = jnp.zeros((1, 16, 2, 8), jnp.bfloat16)
    with pytest.raises(RuntimeError, match="attention_impl='reference'"):
        cudnn._cudnn_window_bwd(q, q, q, q, jnp.zeros((1, 2, 16)), q, 0.3, 4)


def test_swa_sink_merge_keeps_no_float32_activations(monkeypatch):
    """What the backward pass keeps is bf16 (q, k, v, the merged output) and the (B, N, T) LSE:
    a float32 (B, T, N, D) residual would be two bf16 copies per layer."""
    from jax._src.ad_checkpoint import saved_residuals

    monkeypatch.setattr(cudnn, "_cudnn_call", _exact_window)
    q = jnp.asarray(np.random.default_rng(2).standard_normal((2, 64, 4, 8)), jnp.bfloat16)
    merged = lambda q: cudnn.swa_sink_attention(  # noqa: E731
        q, q, q, scale=0.3, window=8, sink=4).astype(jnp.float32).sum()
    saved = [aval for aval, _ in saved_residuals(merged, q)]
    assert saved and not [a for a in saved if a.dtype == jnp.float32 and a.size >= q.size], saved


def test_swa_sink_part_reads_activations_in_their_own_layout(monkeypatch):
    """The sink part's GEMMs batch over sequences only and nothing of q's size is transposed:
    per-head GEMMs (batched over B and heads) make XLA write transposed copies of q and dO, ~1 GB
    a layer on base. cuDNN's calls are stood in for by pass-throughs, so only the sink part and
    the merge are in the program."""
    B, T, N, K, D = 2, 64, 4, 2, 8
    monkeypatch.setattr(cudnn, "_cudnn_call", lambda q, k, v, scale, window, lse: (
        q, jnp.zeros((B, N, T), jnp.float32)))
    monkeypatch.setattr(cudnn, "_cudnn_window_bwd", lambda q, k, v, *rest: (q, k, v))
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((B, T, N, D)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((B, T, K, D)), jnp.bfloat16)
    step = jax.make_jaxpr(jax.grad(lambda q, k: cudnn.swa_sink_attention(
        q, k, k, scale=0.3, window=8, sink=4).astype(jnp.float32).sum(), argnums=(0, 1)))(q, k)

    def eqns(jaxpr):
        for e in jaxpr.eqns:
            yield e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from eqns(sub)

    ops = list(eqns(step.jaxpr))
    dots = [e for e in ops if e.primitive.name == "dot_general"]
    for e in dots:
        (_, _), (batch_lhs, batch_rhs) = e.params["dimension_numbers"]
        assert tuple(batch_lhs) == tuple(batch_rhs) == (0,), e
    assert len(dots) == 5  # scores (forward and again backward), dP, dK, dV
    big_transposes = [e for e in ops if e.primitive.name == "transpose"
                      and e.invars[0].aval.size >= q.size // 2]
    assert not big_transposes, big_transposes

# ---------------------------------------------------------------------------- SwiGLU
def test_swiglu_gradient_is_the_same_with_its_halves_rounded_first():
    """FP8 rounds the two halves of SwiGLU's gradient before joining them (a faster split when
    XLA splits the pass): the same bits as rounding after, and the formula's derivative."""
    from swamla_jax import layers

    rng = np.random.default_rng(5)
    gu = jnp.asarray(3 * rng.standard_normal((2, 7, 2, 16)), jnp.bfloat16)
    dh = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.bfloat16)
    grads = [jax.vjp(lambda g, r=r: layers._swiglu(g, r), gu)[1](dh)[0] for r in (False, True)]
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(grads[0], np.float32),
                                  np.asarray(grads[1], np.float32))
    ref = jax.vjp(lambda g: jax.nn.silu(g[..., 1, :]) * g[..., 0, :],
                  gu.astype(jnp.float32))[1](dh.astype(jnp.float32))[0]
    assert rel(grads[1], ref) < 1e-2  # bf16 rounding of the result only


def test_swiglu_backward_has_no_one_half_intermediate():
    """Without FP8 the backward computes at the fused (..., 2, F) shape only: a sigmoid on one
    (..., 1, F) half, broadcast into the select, is what XLA writes out as a float32 half between
    two passes on an H200."""
    from swamla_jax import layers

    gu = jnp.zeros((2, 7, 2, 16), jnp.bfloat16)
    bwd = jax.make_jaxpr(lambda g, d: jax.vjp(lambda g: layers._swiglu(g, False), g)[1](d))(
        gu, jnp.zeros((2, 7, 16), jnp.bfloat16))
    # The backward's equations (the forward's own sigmoid lies inside the custom_vjp call).
    sigmoids = [e.outvars[0].aval.shape for e in bwd.jaxpr.eqns if e.primitive.name == "logistic"]
    assert sigmoids and set(sigmoids) == {gu.shape}, sigmoids


@pytest.mark.parametrize("shape", [(2, 8, 2, 256), (1, 24, 2, 384)])
def test_swiglu_kernel_is_xlas_backward(shape):
    """The Pallas backward gives XLA's bits in Pallas' interpreter (CPU), and XLA's values to a
    bf16 rounding on GPU: one formula, rounded once. 384 = 3 x 128 takes 128-wide tiles."""
    from swamla_jax import layers
    from swamla_jax.kernels import swiglu as swiglu_kernel

    rng = np.random.default_rng(6)
    gu = jnp.asarray(3 * rng.standard_normal(shape), jnp.bfloat16)
    d = jnp.asarray(rng.standard_normal(shape[:2] + shape[3:]), jnp.bfloat16)
    assert swiglu_kernel.supported(shape)
    got = swiglu_kernel.swiglu_grad(gu, d)
    assert got.dtype == jnp.bfloat16 and got.shape == gu.shape
    got, want = (np.asarray(a, np.float32) for a in (got, layers._swiglu_select_grad(gu, d, False)))
    if on_gpu:  # Triton's sigmoid and exp are not XLA's: at most one bf16 rounding step apart
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-30)
    else:
        np.testing.assert_array_equal(got, want)


def test_swiglu_kernel_declines_shapes_it_cannot_tile():
    from swamla_jax.kernels import swiglu as swiglu_kernel

    assert not swiglu_kernel.supported((1, 7, 2, 256))  # 7 rows: not a whole tile
    assert not swiglu_kernel.supported((2, 8, 2, 100))  # no power-of-two tile of >= 128 divides
    with pytest.raises(ValueError, match="mlp_impl must be one of"):
        auto_plan(mlp_impl="triton")


def test_model_gradients_are_the_same_with_the_swiglu_kernel():
    cfg = load_preset("tiny", n_layer=3)
    params = sj.from_config(cfg).params
    idx = np.random.default_rng(3).integers(0, 1000, (2, 40))

    def grads(impl):
        module = sj.SWAMLA(cfg, auto_plan(compute_dtype="bfloat16", mlp_impl=impl))
        return jax.grad(lambda p: module.apply({"params": p}, idx, idx)[1])(params)

    for a, b in zip(jax.tree_util.tree_leaves(grads("pallas")),
                    jax.tree_util.tree_leaves(grads("xla"))):
        if on_gpu:  # the kernel's values are XLA's to a bf16 rounding there
            assert rel(a, b) < 2e-2
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_swiglu_kernel_runs_per_shard_in_a_sharded_step():
    """On 4 devices (FSDP 2 x tensor 2) the kernel runs on each device's shard, under shard_map,
    and the step is XLA's: same loss and gradient norm."""
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, "benchmarks")
        from bench_train import jax_setup
        from swamla_jax.kernels import swiglu as swiglu_kernel
        calls, local = [], swiglu_kernel._local_grad
        swiglu_kernel._local_grad = lambda gu, d: calls.append(gu.shape) or local(gu, d)
        out = []
        for impl in ("pallas", "xla"):
            with jax_setup("tiny", 128, 4, "bf16", "none",
                           ["mesh_fsdp=2", "mesh_tensor=2", f"mlp_impl={impl}"], 4) as (
                    trainer, state, batch, mesh):
                _, m = trainer.train_step(state, batch)
                out.append((float(m["loss"]), float(m["grad_norm"])))
        print("RESULT", repr((sorted(set(calls)), out)))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1]
    shapes, ((loss_k, norm_k), (loss_x, norm_x)) = ast.literal_eval(result[len("RESULT "):])
    assert shapes == [(4, 128, 2, 128)], shapes  # batch 8 over fsdp 2, width 256 over tensor 2
    assert abs(loss_k - loss_x) < 1e-6 * loss_x and abs(norm_k - norm_x) < 1e-4 * norm_x


# ---------------------------------------------------------------------------- fused projections
def all_eqns(jaxpr):
    """The equations of a jaxpr and of every jaxpr nested in their parameters."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
                if hasattr(sub, "eqns"):
                    yield from all_eqns(sub)


def test_fused_projection_cotangent_is_written_once():
    """bf16 fused projections: the dx and dW GEMMs read one materialized cotangent (the
    barrier's output), not each its own fusion of the parts' gradients."""
    from swamla_jax.kernels import projections

    x = jnp.ones((2, 8, 16), jnp.bfloat16)
    params = [(jnp.ones((16, n), jnp.float32), None) for n in (16, 8, 8)]

    def f(x, ws):
        return projections.fused_projections(x, [(w, None) for w in ws],
                                             ComputePlan(compute_dtype="bfloat16"))

    _, vjp = jax.vjp(f, x, [w for w, _ in params])
    bwd = jax.make_jaxpr(vjp)([jnp.ones((2, 8, n), jnp.bfloat16) for n in (16, 8, 8)])

    ops = list(all_eqns(bwd.jaxpr))
    barrier = [e for e in ops if e.primitive.name == "optimization_barrier"]
    assert len(barrier) == 1 and barrier[0].outvars[0].aval.shape == (2, 8, 32), barrier
    readers = [e for e in ops if e.primitive.name == "dot_general"
               and barrier[0].outvars[0] in e.invars]
    assert len(readers) == 2, readers  # d(x) and d(W)


# ---------------------------------------------------------------------------- FP8
def test_fp8_matmul_is_close_and_differentiable():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 16, 64)), jnp.bfloat16)
    w = jnp.asarray(0.05 * rng.standard_normal((64, 48)), jnp.float32)
    y8 = fp8.fp8_matmul(x, w)
    y = jnp.einsum("btk,kn->btn", x.astype(jnp.float32), w)
    assert y8.dtype == jnp.bfloat16 and rel(y8, y) < 0.08  # e4m3: 3 mantissa bits
    cot = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    gx8, gw8 = jax.grad(lambda x, w: jnp.sum(fp8.fp8_matmul(x, w).astype(jnp.float32) * cot),
                        argnums=(0, 1))(x, w)
    gx, gw = jax.grad(lambda x, w: jnp.sum(jnp.einsum("btk,kn->btn", x.astype(jnp.float32), w)
                                           * cot), argnums=(0, 1))(x, w)
    assert gx8.dtype == x.dtype and gw8.dtype == w.dtype
    assert rel(gx8, gx) < 0.15 and rel(gw8, gw) < 0.15  # e5m2 gradients: 2 mantissa bits


def test_fp8_matmul_with_several_output_axes_equals_the_flat_one():
    """A (K, 2, F) kernel (SwiGLU's fused projection) gives the (K, 2F) product reshaped, with the
    same quantization (per-tensor scales), in value and in both gradients."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.bfloat16)
    w = jnp.asarray(0.05 * rng.standard_normal((32, 2, 24)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((2, 8, 2, 24)), jnp.float32)
    split = lambda x, w: jnp.sum(fp8.fp8_matmul(x, w).astype(jnp.float32) * cot)  # noqa: E731
    flat = lambda x, w: jnp.sum(fp8.fp8_matmul(x, w.reshape(32, 48)).astype(jnp.float32)  # noqa: E731
                                * cot.reshape(2, 8, 48))
    np.testing.assert_array_equal(fp8.fp8_matmul(x, w).reshape(2, 8, 48),
                                  fp8.fp8_matmul(x, w.reshape(32, 48)))
    for a, b in zip(jax.grad(split, (0, 1))(x, w), jax.grad(flat, (0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(a, np.float32).reshape(-1),
                                   np.asarray(b, np.float32).reshape(-1), rtol=1e-2, atol=1e-3)


def test_fp8_rejects_other_contractions():
    with pytest.raises(ValueError, match="supports x"):
        fp8.fp8_dot_general(jnp.ones((2, 3)), jnp.ones((2, 3)), (((0,), (0,)), ((), ())))


def test_fp8_model_trains_on_cpu_emulation():
    cfg = load_preset("tiny", n_layer=3)
    module = sj.SWAMLA(cfg, auto_plan(compute_dtype="bfloat16", fp8=True))
    params = sj.from_config(cfg).params
    idx = np.random.default_rng(3).integers(0, 1000, (2, 40))
    loss, grads = jax.value_and_grad(lambda p: module.apply({"params": p}, idx, idx)[1])(params)
    ref = sj.SWAMLA(cfg, auto_plan(compute_dtype="bfloat16")).apply({"params": params}, idx,
                                                                     idx)[1]
    assert np.isfinite(float(loss)) and abs(float(loss) - float(ref)) < 0.02 * float(ref)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


# ---------------------------------------------------------------------------- GPU only
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("window,sink,kv_heads", [(256, 4, 16), (256, 4, 4), (128, 0, 16)])
def test_cudnn_swa_matches_reference(window, sink, kv_heads):
    rng = np.random.default_rng(4)
    shape = (2, 1024, 16, 64)
    q = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal(shape[:2] + (kv_heads, 64)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal(shape[:2] + (kv_heads, 64)), jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)

    def run(impl, dtype):
        f = lambda q, k, v: jnp.sum(attention(  # noqa: E731
            q.astype(dtype), k.astype(dtype), v.astype(dtype), scale=0.125, window=window,
            sink=sink, impl=impl).astype(jnp.float32) * cot.astype(jnp.float32))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    (_, g_fast), (_, g_ref) = run("cudnn", jnp.bfloat16), run("reference", jnp.float32)
    out_fast = attention(q, k, v, scale=0.125, window=window, sink=sink, impl="cudnn")
    out_ref = attention(*(t.astype(jnp.float32) for t in (q, k, v)), scale=0.125, window=window,
                        sink=sink)
    assert rel(out_fast, out_ref) < 2e-2
    for name, a, b in zip("qkv", g_fast, g_ref):
        assert rel(a, b) < 3e-2, name


@gpu
@pytest.mark.gpu
def test_cudnn_mla_matches_reference():
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((2, 1024, 16, 192)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, 1024, 16, 192)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((2, 1024, 16, 128)), jnp.bfloat16)
    fast = attention(q, k, v, scale=192 ** -0.5, impl="cudnn")
    ref = attention(*(t.astype(jnp.float32) for t in (q, k, v)), scale=192 ** -0.5)
    assert rel(fast, ref) < 2e-2


@gpu
@pytest.mark.gpu
def test_bf16_model_logits_match_float32():
    """Mean per-token KL(p_fp32 || p_bf16) <= 1e-3 on the small preset's shapes."""
    cfg = load_preset("tiny", n_embd=256, n_head=4, n_layer=6, block_size=1024, swa_window=256)
    params = sj.from_config(cfg, seed=0).params
    idx = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 1024))
    lp32 = jax.nn.log_softmax(sj.SWAMLA(cfg, auto_plan()).apply({"params": params}, idx)[0])
    lp16 = jax.nn.log_softmax(sj.SWAMLA(cfg, auto_plan(compute_dtype="bfloat16")).apply(
        {"params": params}, idx)[0])
    kl = jnp.sum(jnp.exp(lp32) * (lp32 - lp16), axis=-1).mean()
    assert float(kl) <= 1e-3


@gpu
@pytest.mark.gpu
def test_fp8_gemms_are_in_the_compiled_hlo():
    """The XLA FP8 rewrite fails silently when the pattern breaks: assert the cuBLASLt FP8 GEMM."""
    cfg = load_preset("tiny", n_embd=256, n_head=4, block_size=256)
    module = sj.SWAMLA(cfg, auto_plan(compute_dtype="bfloat16", fp8=True))
    params = sj.from_config(cfg).params
    idx = jnp.zeros((4, 256), jnp.int32)
    step = jax.jit(jax.grad(lambda p: module.apply({"params": p}, idx, idx)[1]))
    hlo = step.lower(params).compile().as_text()
    f8, bf16 = hlo.count("__cublas$lt$matmul$f8"), hlo.count('"__cublas$lt$matmul"')
    # XLA emits the small GEMMs of this model as Triton fusions; of those left to cuBLASLt, the
    # block projections must be FP8 (H100, JAX 0.11.2: 4 FP8 against 3 bf16, the latter being the
    # tied LM head and its two gradients). A silent fallback leaves no FP8 GEMM at all.
    assert f8 > 0 and f8 >= bf16, (f8, bf16)


@gpu
@pytest.mark.gpu
def test_fp8_training_tracks_bf16(fp8_and_bf16_runs):
    """200 steps of FP8 training end within 2% of the bf16 run's loss (same data and init)."""
    from swamla_jax.train import train

    final = {name: last for name, (_, last) in fp8_and_bf16_runs(train).items()}
    assert abs(final["fp8"] - final["bf16"]) <= 0.02 * final["bf16"], final
