"""The memory-bound passes of a layer, timed alone: SwiGLU and RoPE, forward and backward.

    python benchmarks/bench_passes.py [--preset base] [--batch 8] [--seq 2048] [--out passes.json]

A step's profile (``profile_step.py``) says how long each fused pass takes inside the step and
``--traffic`` what its bytes allow; this script times one layer's passes in isolation, in the
form the model uses (``swamla_jax.layers``) and in candidate forms kept here, at the preset's
shapes, and prints the bandwidth each reaches against the bytes it must move (inputs read once,
outputs written once). A candidate earns its place in the model only by then winning the whole
step in ``bench_train.py``: inside the step XLA fuses these passes with their neighbours, and a
pass that wins alone can lose there (see benchmarks/history/). Each call is dispatched from Python, so
a pass shorter than ~0.1 ms (RoPE at base's shapes) can measure the dispatch, not the kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from swamla.config import load_preset  # noqa: E402
from swamla_jax import layers  # noqa: E402

f32, bf16, u32 = jnp.float32, jnp.bfloat16, jnp.uint32


# --- SwiGLU candidates on the fused (..., 2, F) = (up, gate) projection -------------------------

@jax.checkpoint
def _swiglu_autodiff(gate_up):
    """An earlier form of the model's: silu on the bf16 gate, remat, autodiff's
    backward (each half's gradient zero-padded to the full tensor, the two added)."""
    return jax.nn.silu(gate_up[..., 1, :]) * gate_up[..., 0, :]


def _with_backward(bwd):
    """The model's SwiGLU forward with another backward."""
    def forward(gate_up):
        return layers._swiglu.fun(gate_up, False)

    fn = jax.custom_vjp(forward)
    fn.defvjp(lambda g: (forward(g), g), bwd)
    return fn


def _bwd_stacked(gate_up, d_out):
    """The two halves' gradients computed apart and stacked."""
    up, gate = gate_up[..., 0, :].astype(f32), gate_up[..., 1, :].astype(f32)
    grads = layers.swiglu_grads(up, gate, d_out.astype(f32))
    return (jnp.stack(grads, axis=-2).astype(gate_up.dtype),)


def _bwd_select(gate_up, d_out):
    """The model's backward without its barrier (alone it runs as fast; in a step XLA merged its
    float32 casts with the forward's and kept a float32 gate alive in between)."""
    return (layers._swiglu_select_grad(gate_up, d_out, False),)


def _bwd_select_halves(gate_up, d_out):
    """An earlier backward of the model's: each half's gradient computed once on the (..., 1, F)
    halves and broadcast into one select. On an H200, inside the step, XLA wrote a float32
    half between two passes rather than redo the sigmoid for both halves."""
    up, gate = gate_up[..., 0:1, :].astype(f32), gate_up[..., 1:2, :].astype(f32)
    d_up, d_gate = layers.swiglu_grads(up, gate, d_out[..., None, :].astype(f32))
    is_up = lax.broadcasted_iota(jnp.int32, gate_up.shape, gate_up.ndim - 2) == 0
    return (jnp.where(is_up, d_up, d_gate).astype(gate_up.dtype),)


def _swiglu_model(gate_up):
    """The model's SwiGLU with XLA's backward (``--mlp_impl xla``; FP8 rounds the gradient's
    halves first)."""
    return layers._swiglu(gate_up, False)


def _swiglu_kernel(gate_up):
    """The model's SwiGLU with the Pallas backward (``--mlp_impl pallas``, the bf16 step's
    choice on GPU; swamla_jax.kernels.swiglu), XLA's form where the shape does not tile."""
    return layers._swiglu(gate_up, False, True)


SWIGLU = (("model, XLA backward (layers._swiglu: select after a barrier)", _swiglu_model),
          ("model, Pallas backward (swamla_jax.kernels.swiglu)", _swiglu_kernel),
          ("autodiff, bf16 silu", _swiglu_autodiff),
          ("custom vjp, halves stacked", _with_backward(_bwd_stacked)),
          ("custom vjp, select, no barrier", _with_backward(_bwd_select)),
          ("custom vjp, select of broadcast halves",
           _with_backward(_bwd_select_halves)))


# --- RoPE candidates on interleaved pairs -------------------------------------------------------

def _rope_swapped(x, cos, sin):
    """``x * cos + swap(x) * sin``: cos repeated per pair, sin signed (-, +), swap exchanging
    the two of each pair."""
    xf = x.astype(f32)
    swapped = xf.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    cos2 = jnp.repeat(cos, 2, axis=-1)[:, None, :]
    sin2 = jnp.stack((-sin, sin), axis=-1).reshape(sin.shape[0], 1, -1)
    return (xf * cos2 + swapped * sin2).astype(x.dtype)


@jax.custom_vjp
def _rope_words(x, cos, sin):
    """bf16 pairs read and written as one 32-bit word each: a bf16 is the top half of the
    float32 of the same value, so each half becomes a float32 by a shift or a mask, and the
    rotated halves, rounded as ``astype`` rounds, are packed back. The model's numbers exactly
    (bf16 inputs only)."""
    words = lax.bitcast_convert_type(x.reshape(*x.shape[:-1], -1, 2), u32)
    x0 = lax.bitcast_convert_type(words << 16, f32)  # element 2p: the low half (little-endian)
    x1 = lax.bitcast_convert_type(words & u32(0xFFFF0000), f32)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def bits(y):
        return lax.bitcast_convert_type(y.astype(bf16), jnp.uint16).astype(u32)

    out = bits(x0 * sin + x1 * cos) << 16 | bits(x0 * cos - x1 * sin)
    return lax.bitcast_convert_type(out, bf16).reshape(x.shape)


def _rope_words_bwd(tables, dy):
    cos, sin = tables  # a rotation's transpose is the rotation by the opposite angle
    return _rope_words(dy, cos, -sin), jnp.zeros_like(cos), jnp.zeros_like(sin)


_rope_words.defvjp(lambda x, cos, sin: (_rope_words(x, cos, sin), (cos, sin)), _rope_words_bwd)

ROPE = (("model (layers.apply_rope: pairs split and stacked)", layers.apply_rope),
        ("swapped pairs, elementwise", _rope_swapped),
        ("packed 32-bit pairs", _rope_words))


def _time(fn, *args, iters: int) -> float:
    """Median over 5 rounds of the seconds per call of a jitted ``fn``, after compiling."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return sorted(times)[len(times) // 2]


def swiglu_cases(B, T, F):
    gu = jax.random.normal(jax.random.PRNGKey(0), (B, T, 2, F), bf16)
    dh = jax.random.normal(jax.random.PRNGKey(1), (B, T, F), bf16)
    n = B * T * F
    for name, fn in SWIGLU:
        yield f"swiglu fwd: {name}", jax.jit(fn), (gu,), 3 * 2 * n
        bwd = jax.jit(lambda g, d, fn=fn: jax.vjp(fn, g)[1](d)[0])
        yield f"swiglu bwd: {name}", bwd, (gu, dh), 5 * 2 * n


def rope_cases(B, T, H, D):
    x = jax.random.normal(jax.random.PRNGKey(2), (B, T, H, D), bf16)
    dy = jax.random.normal(jax.random.PRNGKey(3), (B, T, H, D), bf16)
    cos, sin = layers.rope_tables(D, jnp.arange(T), 10000.0, 1.0)
    n = B * T * H * D
    for name, fn in ROPE:
        yield f"rope fwd: {name}", jax.jit(fn), (x, cos, sin), 2 * 2 * n
        bwd = jax.jit(lambda x, c, s, d, fn=fn: jax.vjp(lambda x: fn(x, c, s), x)[1](d)[0])
        yield f"rope bwd: {name}", bwd, (x, cos, sin, dy), 2 * 2 * n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default="passes.json")
    args = p.parse_args(argv)
    cfg = load_preset(args.preset)
    B, T = args.batch, args.seq
    device = jax.devices()[0].device_kind
    rows = []
    print(f"{device}, {args.preset}: batch {B}, sequence {T}")
    print("| pass | ms | GB moved | GB/s |\n|---|---|---|---|")
    for name, fn, fargs, nbytes in (*swiglu_cases(B, T, cfg.mlp_hidden),
                                    *rope_cases(B, T, cfg.n_head, cfg.head_dim)):
        s = _time(fn, *fargs, iters=args.iters)
        rows.append(dict(name=name, ms=s * 1e3, bytes=nbytes, gbps=nbytes / s / 1e9))
        print(f"| {name} | {s * 1e3:.3f} | {nbytes / 1e9:.3f} | {nbytes / s / 1e9:.0f} |",
              flush=True)
    Path(args.out).write_text(json.dumps(dict(device=device, preset=args.preset, batch=B, seq=T,
                                              rows=rows), indent=1))


if __name__ == "__main__":
    main()
