"""The memory-bound passes of a layer, timed alone: SwiGLU and RoPE, forward and backward.

    python benchmarks/bench_passes.py [--preset base] [--batch 8] [--seq 2048] [--out passes.json]

A step's profile (``profile_step.py``) says how long each fused pass takes inside the step and
``--traffic`` what its bytes allow; this script times the passes of one layer in isolation, in
the form the model uses (``swamla_jax.layers``) and in the alternative forms kept here for
comparison, at the preset's shapes, and prints the bandwidth each reaches against the bytes it
must move (inputs read once, outputs written once). A form only earns its place in the model by
winning here and then in ``bench_train.py``'s step.
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
from flax import linen as nn  # noqa: E402

from swamla.config import load_preset  # noqa: E402
from swamla_jax import layers  # noqa: E402

f32, bf16 = jnp.float32, jnp.bfloat16


# --- SwiGLU on the fused (..., 2, F) = (up, gate) projection -----------------------------------

@jax.checkpoint
def _swiglu_autodiff_bf16(gate_up):
    """The form before this script: silu on the bf16 gate, the backward left to autodiff."""
    return nn.silu(gate_up[..., 1, :]) * gate_up[..., 0, :]


@jax.custom_vjp
def _swiglu_stack(gate_up):
    return layers._swiglu(gate_up)


def _swiglu_stack_bwd(gate_up, d_out):
    """The model's backward with the two halves computed apart and stacked."""
    up, gate = gate_up[..., 0, :].astype(f32), gate_up[..., 1, :].astype(f32)
    sig, d = jax.nn.sigmoid(gate), d_out.astype(f32)
    grad = jnp.stack((d * gate * sig, d * up * sig * (1.0 + gate * (1.0 - sig))), axis=-2)
    return (grad.astype(gate_up.dtype),)


_swiglu_stack.defvjp(lambda g: (layers._swiglu(g), g), _swiglu_stack_bwd)


def _rope_autodiff_stack(x, cos, sin):
    """The form before this script: pairs split, rotated and stacked back."""
    xf = x.astype(f32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = jnp.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _time(fn, *args, iters: int) -> float:
    """Median seconds per call of a jitted ``fn`` over ``iters`` calls, after compiling."""
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
    key = jax.random.PRNGKey(0)
    gu = jax.random.normal(key, (B, T, 2, F), bf16)
    dh = jax.random.normal(jax.random.PRNGKey(1), (B, T, F), bf16)
    n = B * T * F
    for name, fn in (("autodiff, bf16 silu (before)", _swiglu_autodiff_bf16),
                     ("custom vjp, halves stacked", _swiglu_stack),
                     ("model (layers._swiglu)", layers._swiglu)):
        fwd = jax.jit(fn)
        bwd = jax.jit(lambda g, d, fn=fn: jax.vjp(fn, g)[1](d)[0])
        yield f"swiglu fwd: {name}", fwd, (gu,), 3 * 2 * n
        yield f"swiglu bwd: {name}", bwd, (gu, dh), 5 * 2 * n


def rope_cases(B, T, H, D):
    x = jax.random.normal(jax.random.PRNGKey(2), (B, T, H, D), bf16)
    dy = jax.random.normal(jax.random.PRNGKey(3), (B, T, H, D), bf16)
    cos, sin = layers.rope_tables(D, jnp.arange(T), 10000.0, 1.0)
    n = B * T * H * D
    for name, fn in (("autodiff, stacked pairs (before)", _rope_autodiff_stack),
                     ("swapped pairs, elementwise", layers._rotate_pairs),
                     ("model (layers.apply_rope)", layers.apply_rope)):
        fwd = jax.jit(fn)
        bwd = jax.jit(lambda x, c, s, d, fn=fn: jax.vjp(lambda x: fn(x, c, s), x)[1](d)[0])
        yield f"rope fwd: {name}", fwd, (x, cos, sin), 2 * 2 * n
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
    rows = []
    cases = [*swiglu_cases(B, T, cfg.mlp_hidden),
             *rope_cases(B, T, cfg.n_head, cfg.head_dim)]
    print(f"{jax.devices()[0].device_kind}, {args.preset}: batch {B}, sequence {T}")
    print("| pass | ms | GB moved | GB/s |\n|---|---|---|---|")
    for name, fn, fargs, nbytes in cases:
        s = _time(fn, *fargs, iters=args.iters)
        rows.append(dict(name=name, ms=s * 1e3, bytes=nbytes, gbps=nbytes / s / 1e9))
        print(f"| {name} | {s * 1e3:.3f} | {nbytes / 1e9:.3f} | {nbytes / s / 1e9:.0f} |",
              flush=True)
    Path(args.out).write_text(json.dumps(dict(device=jax.devices()[0].device_kind,
                                              preset=args.preset, batch=B, seq=T, rows=rows),
                                         indent=1))


if __name__ == "__main__":
    main()
