"""Training-step benchmark: tokens/s (total and per GPU), MFU, step time, peak memory, compile time.

    python benchmarks/bench_train.py --cases jax:base:2048:bf16 jax:base:2048:fp8 \
        torch:base:2048:bf16 jax:base:2048:bf16@4 torch:base:2048:bf16@4 --batch 8 \
        --out bench.json --md bench.md

A case is ``framework:preset:sequence:dtype[@gpus]``: dtype bf16 or fp8 (JAX: float8
``dot_general``; torch: ``torch._scaled_mm``), torch cases compiled unless ``--no-compile``. With
``@gpus`` > 1 a JAX case runs one process over that many devices on the mesh its flags give
(default all FSDP; ``+mesh_tensor=2`` etc.) and a torch case runs under torchrun with DDP
(``+fsdp=true``: FSDP2), as the trainers would. ``--batch`` is per data-parallel GPU (weak
scaling). ``+field=value`` overrides any training/model flag for ablations
(``jax:small:2048:bf16+loss_chunk=0+scan_layers=false``).

Each case runs in its own process (JAX preallocates GPU memory; one framework must not hold
memory while the other measures) and times whole optimizer steps (forward, backward, clipping,
AdamW) on random tokens after warm-up. For JAX FP8 cases the count of cuBLASLt FP8 GEMMs in
the compiled HLO is reported, so a silent fallback to bf16 shows.

MFU (``swamla.flops.mfu``) = 6 * n_params * tokens/s per GPU / peak, where n_params is
``swamla.layout.count_params`` (the true count, tied embedding counted once; attention
score/value matmuls not counted) and peak is one card's dense bf16 datasheet peak from
``swamla.flops.peak_flops`` (989e12 FLOP/s for H100 SXM and H200). FP8 cases are measured
against the same bf16 peak. CPUs and unknown cards have no peak: MFU n/a. ``MFU+attn``
(``swamla.flops.mfu_with_attention``, PaLM's definition) adds the attention score and value
matmuls, counting for each query only the keys it sees: (T + 1) / 2 on average in MLA blocks,
its window and sink in SWA blocks. It is the figure to compare across sequence lengths: the
headline 6N MFU must fall as T grows, since MLA attention is quadratic.

The exit status is 1 when any case failed (its row and the last line say which), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_START = time.perf_counter()
_CHILD = False  # set in a case's own process (--one), whose stdout the parent reads


def stage(doing: str) -> None:
    """Tells the parent process what a case is doing now, so a case stopped by
    ``--case-timeout`` can be reported with the stage it was in."""
    if _CHILD:
        print(f"STAGE {time.perf_counter() - _START:.0f} {doing}", flush=True)


def timeout_error(seconds: float, stdout) -> str:
    """The error of a case stopped after ``seconds``, from what its process printed."""
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    stages = [line.split(" ", 2)[1:] for line in (stdout or "").splitlines()
              if line.startswith("STAGE ")]
    if not stages:
        return f"timed out after {seconds:.0f} s while starting (imports, devices)"
    since, doing = stages[-1]
    return f"timed out after {seconds:.0f} s while {doing} (begun at {since} s)"


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


@contextlib.contextmanager
def jax_setup(preset, seq, batch, dtype, remat, extra=(), devices=1):
    """Yields (trainer, state, batch arrays, mesh) for one case on the first ``devices`` devices,
    inside the mesh and logical-axis-rules contexts the trainer runs under; ``batch`` is per
    data-parallel device, as ``--batch_size`` is."""
    import flax.linen as nn
    import jax
    import numpy as np

    from swamla.train_config import parse_args
    from swamla_jax import sharding
    from swamla_jax.train import Trainer

    cfg = parse_args(_train_flags(preset, seq, batch, dtype, remat, extra))
    stage("building the model and its state")
    if devices > len(jax.devices()):
        raise ValueError(f"case asks for {devices} devices, {len(jax.devices())} present")
    mesh = sharding.make_mesh(cfg.mesh_shape(devices), jax.devices()[:devices])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        trainer = Trainer(cfg, mesh)
        state = trainer.init_state()
        rows = batch * mesh.shape["data"] * mesh.shape["fsdp"]
        tokens = list(np.random.default_rng(0).integers(0, 50257, (2, 1, rows, seq))
                      .astype(np.int32))
        if cfg.doc_mask:
            tokens[0], segs = packed_documents(tokens[0])
            tokens.append(segs)
        yield trainer, state, tuple(jax.device_put(t, trainer.batch_sharding) for t in tokens), mesh


def packed_documents(tokens, mean_length: int = 512):
    """Random tokens with EOS closing documents of geometric lengths (mean ``mean_length``), and
    their segment ids: the batches of a ``+doc_mask=true`` case."""
    import numpy as np

    from swamla.data.packing import segment_ids

    rng = np.random.default_rng(1)
    tokens = np.where(rng.random(tokens.shape) < 1 / mean_length, 50256, tokens)
    return tokens.astype(np.int32), segment_ids(tokens.reshape(-1, tokens.shape[-1]),
                                                    50256).reshape(tokens.shape)


def run_jax(preset, seq, batch, dtype, steps, remat, extra=(), devices=1):
    import jax

    from swamla.layout import count_params

    with jax_setup(preset, seq, batch, dtype, remat, extra, devices) as (trainer, state,
                                                                         batch_arr, mesh):
        stage("compiling the step")
        t0 = time.perf_counter()
        compiled = trainer.train_step.lower(state, batch_arr).compile()
        hlo = compiled.as_text()
        stage("running the first step")
        state, m = compiled(state, batch_arr)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        stage("warming up")
        for _ in range(2):
            state, m = compiled(state, batch_arr)
        jax.block_until_ready(m)
        stage(f"timing {steps} steps")
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, batch_arr)
        jax.block_until_ready(m)
        step_s = (time.perf_counter() - t0) / steps
        peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0)
                   for d in mesh.devices.flat)
    return dict(step_s=step_s, compile_s=compile_s, loss=float(m["loss"]), peak_gib=peak / 2**30,
                fp8_gemms=hlo.count("__cublas$lt$matmul$f8"),
                n_params=count_params(trainer.cfg.model), device=jax.devices()[0].device_kind,
                rows=int(batch_arr[0].shape[1]), mesh=dict(mesh.shape))


@contextlib.contextmanager
def torch_setup(preset, seq, batch, dtype, remat, extra=(), compile_model=True, devices=1):
    """Yields one case's torch training step, built as train_torch.py builds it: one process
    per GPU, under torchrun (devices > 1) the model wrapped in DDP, or FSDP2 with
    ``+fsdp=true``. The namespace has ``step()`` (forward, backward, clip, optimizer; returns
    the loss), ``sync()``, ``env``, ``cfg``, ``par`` and ``impl`` (the attention kernel)."""
    import types

    import torch

    from swamla.train_config import parse_args
    from swamla_torch import distributed
    from swamla_torch.optim import build_optimizer
    from swamla_torch.train import build_model

    cfg = parse_args(_train_flags(preset, seq, batch, dtype, remat, extra)
                     + (["--compile"] if compile_model else []))
    stage("building the model")
    env = distributed.setup()
    if env.world_size != devices:
        raise ValueError(f"case asks for {devices} GPUs, torchrun started {env.world_size}")
    torch.manual_seed(0)
    raw = build_model(cfg, env.device)  # as train_torch.py builds it (loss chunks, FP8...)
    impl = raw.plan.attention_impl
    raw = raw.to(env.device)
    cuda = env.device.type == "cuda"  # CPU runs (gloo) only check the launch path
    par = distributed.parallelize(raw, cfg, env)
    opt = build_optimizer(raw.named_parameters(), cfg, env.device)  # as train_torch.py builds it
    x = torch.randint(0, 50257, (batch, seq), device=env.device,
                      generator=torch.Generator(device=env.device).manual_seed(env.rank))
    segs = None
    if cfg.doc_mask:
        x, segs = (torch.from_numpy(a).long().to(env.device)
                   for a in packed_documents(x.cpu().numpy()))

    def step():
        with torch.autocast(env.device.type, dtype=torch.bfloat16):
            _, loss = par.model(x, x, segs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        yield types.SimpleNamespace(step=step, sync=sync, cuda=cuda, env=env, cfg=cfg, par=par,
                                    impl=impl)
    finally:
        distributed.teardown(env)


def run_torch(preset, seq, batch, dtype, steps, remat, extra=(), compile_model=True, devices=1):
    """Times a torch case (torch_setup); rank 0 reports."""
    import torch

    from swamla.layout import count_params
    from swamla_torch import distributed

    with torch_setup(preset, seq, batch, dtype, remat, extra, compile_model, devices) as t:
        env, sync = t.env, t.sync
        sync()
        stage("running the first step" + (" (compiling)" if compile_model else ""))
        t0 = time.perf_counter()
        loss = t.step()
        sync()
        compile_s = time.perf_counter() - t0
        stage("warming up")
        for _ in range(2):
            t.step()
        sync()
        if t.cuda:
            torch.cuda.reset_peak_memory_stats()
        distributed.barrier(env)
        stage(f"timing {steps} steps")
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = t.step()
        sync()
        step_s = (time.perf_counter() - t0) / steps
        step_s = float(distributed.all_reduce_sum(torch.tensor(step_s, device=env.device),
                                                  env)) / env.world_size  # mean over ranks
        peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if t.cuda else 0.0,
                            device=env.device)
        if env.world_size > 1:
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        return dict(step_s=step_s, compile_s=compile_s, loss=float(loss), peak_gib=float(peak),
                    fp8_gemms=None, n_params=count_params(t.cfg.model),
                    device=env.device_name, attention=t.impl, rows=batch * env.world_size,
                    wrap="fsdp2" if t.par.fsdp else "ddp" if t.par.ddp is not None else "none",
                    is_main=env.is_main)


def parse_case(case: str):
    """``framework:preset:seq:dtype[@devices][+field=value...]`` -> its parts."""
    head, *extra = case.split("+")
    head, _, devices = head.partition("@")
    try:
        framework, preset, seq, dtype = head.split(":")
        seq, devices = int(seq), int(devices or 1)
    except ValueError:
        raise SystemExit(f"bad case {case!r}: expected framework:preset:seq:dtype[@devices]"
                         "[+field=value...], e.g. jax:base:2048:bf16@4+mesh_tensor=2") from None
    if framework not in ("jax", "torch") or dtype not in ("bf16", "fp8"):
        raise SystemExit(f"bad case {case!r}: framework is jax or torch, dtype bf16 or fp8")
    return framework, preset, seq, dtype, devices, extra


def case_batch(seq: int, batch: int) -> int:
    """Rows per data-parallel GPU for a case: ``batch`` up to sequence 2048; beyond, as many
    rows as keep the tokens per step of ``batch`` x 2048, so lengths compare at equal work."""
    if seq <= 2048:
        return batch
    if (batch * 2048) % seq:
        raise SystemExit(f"--batch {batch} at sequence {seq} cannot hold the {batch} x 2048 "
                         f"tokens per step the 2048 cases take: use a --batch that is a multiple "
                         f"of {seq // math.gcd(seq, 2048)}")
    return batch * 2048 // seq


def run_case(case: str, batch: int, steps: int, remat: str, compile_model: bool) -> dict:
    framework, preset, seq, dtype, devices, extra = parse_case(case)
    b = case_batch(seq, batch)
    fn = run_jax if framework == "jax" else run_torch
    kwargs = {} if framework == "jax" else {"compile_model": compile_model}
    r = fn(preset, seq, b, dtype, steps, remat, extra, devices=devices, **kwargs)
    from swamla.flops import mfu, mfu_with_attention, peak_flops
    from swamla.train_config import parse_args

    tok_s = r["rows"] * seq / r["step_s"]
    per_gpu = tok_s / devices
    peak = peak_flops(r["device"])
    model = parse_args(_train_flags(preset, seq, b, dtype, remat, extra)).model
    return dict(case=case, framework=framework, preset=preset, seq=seq, dtype=dtype, batch=b,
                devices=devices, remat=remat, tokens_per_s=tok_s, tokens_per_s_per_gpu=per_gpu,
                mfu=mfu(r["n_params"], per_gpu, peak),
                mfu_attention=mfu_with_attention(model, per_gpu, peak, seq), **r)


def markdown(rows: list[dict]) -> str:
    head = ("| case | GPUs | batch/GPU | tokens/s | tokens/s/GPU | MFU | MFU+attn | step ms | "
            "peak GiB | compile s | FP8 GEMMs | loss |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:  # the whole message, as one table cell
            error = " ".join(r["error"].split()).replace("|", "\\|")
            lines.append(f"| {r['case']} | | | failed: {error} | | | | | | | | |")
            continue
        mfu_s = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        attn_s = f"{100 * r['mfu_attention']:.1f}%" if r.get("mfu_attention") else "n/a"
        fp8 = r["fp8_gemms"] if r["fp8_gemms"] is not None else "-"
        lines.append(f"| {r['case']} | {r['devices']} | {r['batch']} | "
                     f"{r['tokens_per_s'] / 1e3:.1f}K | {r['tokens_per_s_per_gpu'] / 1e3:.1f}K | "
                     f"{mfu_s} | {attn_s} | {1e3 * r['step_s']:.1f} | {r['peak_gib']:.1f} | "
                     f"{r['compile_s']:.0f} | {fp8} | {r['loss']:.3f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Runs the cases; returns 1 if any failed, else 0."""
    global _CHILD
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--remat", default="none")
    p.add_argument("--no-compile", action="store_true", help="torch cases run eager")
    p.add_argument("--out", default="bench_train.json")
    p.add_argument("--md", default=None)
    p.add_argument("--case-timeout", type=float, default=None,
                   help="seconds before a case is stopped and reported as failed, with the "
                        "stage it was in (starting, compiling, warming up, timing...)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    if args.one:
        _CHILD = True
        result = run_case(args.cases[0], args.batch, args.steps, args.remat, not args.no_compile)
        if result.pop("is_main", True):
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    for case in args.cases:  # every case checked before the first one runs
        case_batch(parse_case(case)[2], args.batch)
    rows = []
    for case in args.cases:
        framework, *_, devices, _ = parse_case(case)
        launcher = [sys.executable]
        if framework == "torch" and devices > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={devices}"]
        cmd = launcher + [__file__, "--one", "--cases", case, "--batch", str(args.batch),
                          "--steps", str(args.steps), "--remat", args.remat] + (
            ["--no-compile"] if args.no_compile else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ),
                                  timeout=args.case_timeout)
        except subprocess.TimeoutExpired as e:
            rows.append({"case": case, "error": timeout_error(args.case_timeout, e.stdout)})
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
            continue
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode == 0 and found:
            rows.append(json.loads(found[-1][7:]))
        else:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"case": case, "error": err})
            sys.stderr.write(proc.stderr[-3000:])
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))  # after each case: a kill keeps some
    Path(args.out).write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    if args.md:
        Path(args.md).write_text(table)
    print(table, flush=True)
    failed = [r["case"] for r in rows if "error" in r]
    if failed:
        print(f"error: {len(failed)} of {len(rows)} cases failed: {', '.join(failed)} (see their "
              "rows above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
