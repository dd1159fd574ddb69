"""Training-step benchmark: tokens/s, MFU, step time, peak memory and compile time.

    python benchmarks/bench_train.py --cases jax:base:2048:bf16 jax:base:2048:fp8 \
        torch:base:2048:bf16 --batch 8 --out bench.json --md bench.md

A case is ``framework:preset:sequence:dtype`` (dtype bf16 or fp8; torch cases are compiled unless
``--no-compile``), optionally followed by ``+field=value`` overrides of any training/model flag
(``jax:small:2048:bf16+loss_chunk=0+swa_sink_size=0``) for ablations. Each case runs in its own process (JAX preallocates GPU memory; one framework
must not hold memory while the other measures) and times whole optimizer steps: forward,
backward, clipping and AdamW, on random tokens, after warm-up. MFU = 6 * params * tokens/s /
peak (GPU.md's definition; tied embedding counted once). For FP8 cases the count of cuBLASLt FP8
GEMMs in the compiled HLO is reported, so a silent fallback to bf16 shows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _train_flags(preset, seq, batch, dtype, remat, extra=()):
    flags = ["--size", preset, "--block_size", str(seq), "--batch_size", str(batch),
             "--compute_dtype", "bfloat16", "--max_iters", "1000", "--warmup_iters", "10"]
    for item in extra:
        key, value = item.split("=", 1)
        flags += [f"--{key}", value]
    if dtype == "fp8":
        flags.append("--use_fp8")
    if remat != "none":
        flags += ["--gradient_checkpointing", "--remat_policy", remat]
    return flags


def run_jax(preset, seq, batch, dtype, steps, remat, extra=()):
    import jax
    import numpy as np

    from swamla.config import count_params
    from swamla.train_config import parse_args
    from swamla_jax import sharding
    from swamla_jax.train import Trainer

    cfg = parse_args(_train_flags(preset, seq, batch, dtype, remat, extra))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        trainer = Trainer(cfg, mesh)
        state = trainer.init_state()
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 50257, (2, 1, batch, seq)).astype(np.int32)
        batch_arr = tuple(jax.device_put(t, trainer.batch_sharding) for t in tokens)
        t0 = time.perf_counter()
        compiled = trainer.train_step.lower(state, batch_arr).compile()
        hlo = compiled.as_text()
        state, m = compiled(state, batch_arr)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            state, m = compiled(state, batch_arr)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, batch_arr)
        jax.block_until_ready(m)
        step_s = (time.perf_counter() - t0) / steps
        stats = jax.devices()[0].memory_stats() or {}
    return dict(step_s=step_s, compile_s=compile_s, loss=float(m["loss"]),
                peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                fp8_gemms=hlo.count("__cublas$lt$matmul$f8"), n_params=count_params(cfg.model),
                device=jax.devices()[0].device_kind)


def run_torch(preset, seq, batch, dtype, steps, remat, extra=(), compile_model=True):
    import torch

    from swamla.config import count_params
    from swamla.train_config import parse_args
    from swamla_torch.model import SWAMLA

    if dtype != "bf16":
        raise ValueError("torch cases take dtype bf16 (the FP8 torch path is not benchmarked)")
    cfg = parse_args(_train_flags(preset, seq, batch, dtype, remat, extra)).model
    torch.manual_seed(0)
    model = SWAMLA(cfg).cuda()
    model.check_inputs = False
    model.gradient_checkpointing = remat != "none"
    impl = model.set_attention_impl("auto", "cuda", torch.bfloat16)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "wte" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "wte" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}], lr=1e-4,
                            betas=(0.9, 0.95), fused=True)
    fwd = torch.compile(model) if compile_model else model
    x = torch.randint(0, 50257, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    return dict(step_s=step_s, compile_s=compile_s, loss=float(loss),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30, fp8_gemms=None,
                n_params=count_params(cfg), device=torch.cuda.get_device_name(), attention=impl)


def run_case(case: str, batch: int, steps: int, remat: str, compile_model: bool) -> dict:
    base, *extra = case.split("+")
    framework, preset, seq, dtype = base.split(":")
    seq = int(seq)
    b = max(1, batch * 2048 // seq) if seq > 2048 else batch  # same tokens per step
    fn = run_jax if framework == "jax" else run_torch
    kwargs = {} if framework == "jax" else {"compile_model": compile_model}
    r = fn(preset, seq, b, dtype, steps, remat, extra, **kwargs)
    from swamla.flops import mfu, peak_flops

    tok_s = b * seq / r["step_s"]
    return dict(case=case, framework=framework, preset=preset, seq=seq, dtype=dtype, batch=b,
                remat=remat, tokens_per_s=tok_s,
                mfu=mfu(r["n_params"], tok_s, peak_flops(r["device"])), **r)


def markdown(rows: list[dict]) -> str:
    head = ("| case | batch | tokens/s | MFU | step ms | peak GiB | compile s | FP8 GEMMs | loss |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | failed: {r['error'][:80]} | | | | | | |")
            continue
        mfu_s = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        lines.append(f"| {r['case']} | {r['batch']} | {r['tokens_per_s'] / 1e3:.1f}K | {mfu_s} | "
                     f"{1e3 * r['step_s']:.1f} | {r['peak_gib']:.1f} | {r['compile_s']:.0f} | "
                     f"{r['fp8_gemms'] if r['fp8_gemms'] is not None else '-'} | {r['loss']:.3f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--remat", default="none")
    p.add_argument("--no-compile", action="store_true", help="torch cases run eager")
    p.add_argument("--out", default="bench_train.json")
    p.add_argument("--md", default=None)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_case(args.cases[0], args.batch, args.steps, args.remat,
                                               not args.no_compile)), flush=True)
        return
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--one", "--cases", case, "--batch", str(args.batch),
               "--steps", str(args.steps), "--remat", args.remat] + (
            ["--no-compile"] if args.no_compile else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        found = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode == 0 and found:
            rows.append(json.loads(found[-1][7:]))
        else:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"case": case, "error": err})
            sys.stderr.write(proc.stderr[-3000:])
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    if args.md:
        Path(args.md).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
