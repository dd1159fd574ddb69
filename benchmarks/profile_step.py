"""Where a training step spends its GPU time: a profiler trace ranked by op and category.

    python benchmarks/profile_step.py --case jax:small:2048:bf16 --out prof/ [--top 40]
    python benchmarks/profile_step.py --case torch:small:2048:bf16 --out prof_torch/

Builds the step exactly as ``bench_train.py`` does (same case syntax, one process), runs a few
warm-up steps, traces ``--steps`` steps and ranks the device kernels of the trace by total time:
per XLA op (fusion, GEMM custom call, cuDNN attention...) with the op's shape and the JAX source
op it came from (read from the compiled HLO), and per category (GEMM, attention, elementwise
fusion, reduction, copy/transpose, collective, other). Writes ``profile.md`` (the tables),
``profile.json``, the compiled HLO (``hlo.txt.gz``) and the raw trace (``trace.json.gz``, open it in
ui.perfetto.dev) under ``--out``.

XLA replays most of a step as CUDA graphs ("command buffers"), which hide which HLO op each
kernel belongs to; the profile is taken with them off (``--xla_gpu_enable_command_buffer=``,
added to XLA_FLAGS unless XLA_FLAGS already names the flag), and a kernel found inside a command
buffer anyway is attributed by its name, which XLA derives from the fusion's.

A torch case (one GPU, compiled unless ``--no-compile``) is traced with torch.profiler and
ranked by kernel: Inductor names its Triton kernels after the ops they fuse
(``triton_poi_fused_add_mul_...`` pointwise, ``triton_red_``/``triton_per_`` reductions,
``triton_tem_`` templates such as FlexAttention), so the same tables compare the two backends.

    python benchmarks/profile_step.py --summarize prof/   # re-rank a saved trace, no GPU needed
    python benchmarks/profile_step.py --traffic prof/     # bytes moved by memory-bound ops
    python benchmarks/profile_step.py --gaps prof/        # measured time against those bytes

``traffic.md`` (also written by a profile run) ranks the memory-bound ops of the compiled step by
the bytes they read and write: with the HBM bandwidth, a floor under their time to compare
with what the trace measured. ``gaps.md`` (also written by a profile run) makes that comparison
per source op: the measured time, the floor, and the time above it, ranked by the last, i.e.
the passes that run furthest below the bandwidth their bytes allow.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import jax_setup, parse_case, torch_setup  # noqa: E402

CATEGORIES = (  # first match wins; matched against the kernel name and the HLO op name
    ("collective", re.compile(r"nccl|all-gather|all-reduce|reduce-scatter|collective", re.I)),
    ("attention (cuDNN)", re.compile(r"cudnn|fmha|flash|fprop|bprop|sdpa|dot_product_attention",
                                     re.I)),
    ("Triton template (flex attention, GEMM)", re.compile(r"triton_tem", re.I)),
    # Inductor names a kernel by kind first, then by every op it fuses ("_to_copy" included)
    ("reduction", re.compile(r"^triton_(red|per)_")),
    ("elementwise fusion", re.compile(r"^triton_poi_")),
    ("GEMM", re.compile(r"gemm|cublas|xmma|nvjet|matmul|cutlass|\bdot\b|triton_gemm", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|dynamic-update-slice", re.I)),
    ("reduction", re.compile(r"reduce|input_fusion|triton_red|triton_per", re.I)),
    ("elementwise fusion", re.compile(r"fusion|loop|triton_poi|elementwise", re.I)),
)


def category(kernel: str, op: str) -> str:
    for name, pattern in CATEGORIES:
        if pattern.search(op) or pattern.search(kernel):
            return name
    return "other"


_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) (\w[\w\-]*)\((.*?)\)(.*)")


def _instructions(hlo: str):
    """(name, shape, opcode, operand names, label, custom-call target, called computation) of each
    instruction line of an HLO text; the label is 'shape kind | source op', kind being the
    custom-call target, the fusion kind or the opcode, and source the JAX op the instruction came
    from."""
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, operands, rest = m.groups()
        kind = re.search(r"kind=(\w+)", rest)
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        src = re.search(r'op_name="([^"]+)"', rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        what = target.group(1) if target else (kind.group(1) if kind else opcode)
        source = re.sub(r"^jit\([^)]*\)/", "", src.group(1)) if src else ""
        yield (name, shape, opcode, re.findall(r"%([\w.\-]+)", operands),
               f"{shape[:60]} {what} | {source[-90:]}", target.group(1) if target else "",
               calls.group(1) if calls else None)


def hlo_index(hlo: str) -> dict[str, str]:
    """HLO op name -> 'shape kind | source op' from the compiled module's instruction lines."""
    out = {}
    for name, _, _, _, label, _, _ in _instructions(hlo):
        out[name] = out[name.replace(".", "_")] = label
    return out


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
HBM_BYTES_PER_S = 3.0e12  # what a streaming kernel reaches on an H100 SXM (3.35 TB/s peak)


def _arrays(shape: str):
    """(dtype, element count) of each array in an HLO shape (a tuple has several)."""
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        yield dtype, n


def _shape_bytes(shape: str) -> int:
    return sum(n * _DTYPE_BYTES.get(dtype, 0) for dtype, n in _arrays(shape))


def _elements(shape: str) -> int:
    return sum(n for _, n in _arrays(shape))


_COMPUTATION = re.compile(r"(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")


def _computations(hlo: str) -> dict[str, str]:
    """The body text of each computation of an HLO module (fused computations included), by name."""
    out, name, body = {}, None, []
    for line in hlo.splitlines():
        if name is None:
            m = _COMPUTATION.match(line)
            if m:
                name, body = m.group(1), []
        elif line.startswith("}"):
            out[name], name = "\n".join(body), None
        else:
            body.append(line)
    return out


def _fusion_bytes(body: str, result: int, operands: list[int]) -> int:
    """Bytes a fusion moves, from its fused computation: an operand read only through slices
    counts the sliced elements (e.g. one layer of a stacked parameter), and a root
    dynamic-update-slice into an operand (in place) counts the update, not the whole buffer, as
    written and not as read. Bitcasts and converts of an operand are views of it (a fusion
    evaluates them only where they are read)."""
    params, sliced, whole = {}, collections.defaultdict(int), set()
    for line in body.splitlines():
        m = re.match(r"\s*%?([\w.\-]+) = (\S+) parameter\((\d+)\)", line)
        if m:
            params[m.group(1)] = (int(m.group(3)), _shape_bytes(m.group(2)) /
                                  max(_elements(m.group(2)), 1))
    shapes, view = {}, {}  # view: a bitcast or convert of a parameter -> the parameter
    for name, shape, opcode, ops, _, _, _ in _instructions(body):
        shapes[name] = shape
        if opcode in ("bitcast", "convert") and ops and view.get(ops[0], ops[0]) in params:
            view[name] = view.get(ops[0], ops[0])
            continue
        for i, o in enumerate(view.get(o, o) for o in ops):
            if o not in params:
                continue
            if opcode in ("slice", "dynamic-slice") and i == 0:
                sliced[o] += _elements(shape) * params[o][1]
            elif opcode == "dynamic-update-slice" and i == 0 and f"ROOT %{name} " in body:
                result = _shape_bytes(shapes.get(ops[1], ""))  # written in place: the update
                sliced.setdefault(o, 0)  # and the buffer itself not read
            else:
                whole.add(o)
    total = result
    for p, (k, _) in params.items():
        full = operands[k] if k < len(operands) else 0
        total += min(full, sliced[p]) if p in sliced and p not in whole else full
    return int(total)


def hlo_traffic(hlo: str) -> dict:
    """The bytes each memory-bound op of the compiled step's entry computation reads and writes
    (operands + result; GEMMs, attention calls, parameters, constants and bitcasts left out),
    merged over the layers like the profile's sources. A fusion that reads an operand only through
    slices, or updates one in place, counts the slices and the update (``_fusion_bytes``). Their
    sum over the HBM bandwidth is the floor under the elementwise, reduction and copy time,
    whatever the fusions. Only the entry computation is counted: not loop bodies (the chunked
    loss) nor a conditional's branches (the optimizer update, behind the bad-step guard)."""
    computations = _computations(hlo)
    entry = hlo[hlo.index("\nENTRY"):] if "\nENTRY" in hlo else hlo
    shapes, rows = {}, collections.defaultdict(lambda: [0, 0])
    for name, shape, opcode, operands, label, target, calls in _instructions(entry):
        shapes[name] = shape
        if opcode in ("parameter", "constant", "bitcast", "tuple", "get-tuple-element") or \
                re.search(r"cublas|cudnn|gemm", target) or ("kCustom" in label and "gemm" in name):
            continue
        reads = [_shape_bytes(shapes.get(o, "")) for o in operands]
        if opcode == "fusion" and calls in computations:
            moved = _fusion_bytes(computations[calls], _shape_bytes(shape), reads)
        else:
            moved = _shape_bytes(shape) + sum(reads)
        row = rows[source_key(label)]
        row[0] += moved
        row[1] += 1
    total = sum(b for b, _ in rows.values())
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])
    return {"bytes": total, "ms_at_hbm": total / HBM_BYTES_PER_S * 1e3,
            "ops": [{"source": k, "bytes": b, "ms_at_hbm": b / HBM_BYTES_PER_S * 1e3, "ops": n}
                    for k, (b, n) in ranked]}


def traffic_markdown(t: dict, top: int | None = None) -> str:
    lines = [f"Memory-bound ops of the compiled step (entry computation): "
             f"{t['bytes'] / 1e9:.1f} GB read and written, {t['ms_at_hbm']:.1f} ms at "
             f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s.", "",
             "| source op (shape, kind, JAX source) | MB | ms at HBM speed | HLO ops |",
             "|---|---|---|---|"]
    lines += [f"| {o['source'].replace('|', '/')[:170]} | {o['bytes'] / 1e6:.0f} | "
              f"{o['ms_at_hbm']:.2f} | {o['ops']} |" for o in t["ops"][:top]]
    return "\n".join(lines) + "\n"


def traffic_gaps(profile: dict, traffic: dict) -> dict:
    """The profile's source ops that the traffic count also holds (memory-bound ones), each with
    its measured time, its byte floor and the time above that floor, ranked by the latter. Only
    the profile's ``--top`` sources were kept in profile.json, so smaller ops are not matched."""
    floors = {o["source"]: o for o in traffic["ops"]}
    rows = []
    for src in profile["sources"]:
        floor = floors.get(src["source"])
        if floor is None:
            continue
        ms = src["ms_per_step"]
        rows.append(dict(source=src["source"], ms_per_step=ms, floor_ms=floor["ms_at_hbm"],
                         above_floor_ms=ms - floor["ms_at_hbm"], ops=floor["ops"],
                         gb_per_s=floor["bytes"] / (ms / 1e3) / 1e9 if ms else 0.0))
    rows.sort(key=lambda r: -r["above_floor_ms"])
    return dict(ms_per_step=sum(r["ms_per_step"] for r in rows),
                floor_ms=sum(r["floor_ms"] for r in rows), rows=rows)


def gaps_markdown(g: dict) -> str:
    lines = [f"Memory-bound source ops found in both the profile and the traffic count: "
             f"{len(g['rows'])}, {g['ms_per_step']:.1f} ms measured against a "
             f"{g['floor_ms']:.1f} ms floor at {HBM_BYTES_PER_S / 1e12:.1f} TB/s.", "",
             "| source op (shape, kind, JAX source) | ms/step | floor ms | above floor | GB/s | "
             "HLO ops |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['source'].replace('|', '/')[:170]} | {r['ms_per_step']:.2f} | "
              f"{r['floor_ms']:.2f} | {r['above_floor_ms']:.2f} | {r['gb_per_s']:.0f} | "
              f"{r['ops']} |" for r in g["rows"]]
    return "\n".join(lines) + "\n"


_TORCH_GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def device_events(trace: dict) -> list[dict]:
    """Complete ('X') GPU events of a Chrome trace (kernels, memcpys): on jax.profiler's device
    rows, or of torch.profiler's GPU categories."""
    gpu_pids = {e["pid"] for e in trace["traceEvents"]
                if e.get("ph") == "M" and e.get("name") == "process_name"
                and "/device:GPU" in str(e.get("args", {}).get("name", ""))}
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e
            and (e.get("pid") in gpu_pids or e.get("cat") in _TORCH_GPU_CATS)]


def busy_time(events: list[dict]) -> float:
    """Microseconds during which at least one kernel ran (overlap across streams merged)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _op_of(event: dict) -> str:
    """The HLO op a kernel ran for; inside a command buffer, the fusion its name comes from."""
    op = str(event.get("args", {}).get("hlo_op") or event["name"])
    return event["name"] if op.startswith("command_buffer") else op


def source_key(hlo_entry: str) -> str:
    """An op's 'shape kind | source' with the layer index dropped, so that the same op of every
    layer (the layers are unrolled into separate fusions) adds up in one row."""
    return re.sub(r"block_\d+", "block_*", hlo_entry)


def summarize(events: list[dict], hlo: dict[str, str], steps: int, top: int) -> dict:
    by_op = collections.defaultdict(lambda: [0.0, 0, collections.Counter()])
    by_cat = collections.Counter()
    for e in events:
        op = _op_of(e)
        cat = category(e["name"], op)
        row = by_op[op]
        row[0] += e["dur"]
        row[1] += 1
        row[2][cat] += e["dur"]  # an op's row takes the category of most of its kernel time
        by_cat[cat] += e["dur"]
    kernel_us = sum(by_cat.values())
    ops = sorted(by_op.items(), key=lambda kv: -kv[1][0])
    by_source = collections.defaultdict(lambda: [0.0, 0, collections.Counter()])
    for op, (us, _n, cats) in ops:
        row = by_source[source_key(hlo.get(op, "")) or op]
        row[0] += us
        row[1] += 1
        row[2].update(cats)
    sources = sorted(by_source.items(), key=lambda kv: -kv[1][0])
    return dict(
        kernel_ms_per_step=kernel_us / steps / 1e3,
        busy_ms_per_step=busy_time(events) / steps / 1e3,
        categories=[dict(category=c, ms_per_step=us / steps / 1e3, share=us / kernel_us)
                    for c, us in by_cat.most_common()],
        sources=[dict(source=src, ms_per_step=us / steps / 1e3, share=us / kernel_us, ops=n,
                      category=cats.most_common(1)[0][0])
                 for src, (us, n, cats) in sources[:top]],
        ops=[dict(op=op, ms_per_step=us / steps / 1e3, share=us / kernel_us, calls=n // steps,
                  category=cats.most_common(1)[0][0], hlo=hlo.get(op, ""))
             for op, (us, n, cats) in ops[:top]])


def markdown(case: str, step_ms: float, s: dict) -> str:
    lines = [f"# Profile of {case}", "",
             (f"step {step_ms:.1f} ms wall under the profiler; " if step_ms else "")
             + f"kernels {s['kernel_ms_per_step']:.1f} ms summed, "
             f"GPU busy {s['busy_ms_per_step']:.1f} ms (streams overlapped)", "",
             "| category | ms/step | share |", "|---|---|---|"]
    lines += [f"| {c['category']} | {c['ms_per_step']:.2f} | {100 * c['share']:.1f}% |"
              for c in s["categories"]]
    lines += ["", "Layers merged: one row per source op and shape, summed over the layers' copies.",
              "",
              "| source op (shape, kind, JAX source) | ms/step | share | HLO ops | category |",
              "|---|---|---|---|---|"]
    lines += [f"| {o['source'].replace('|', '/')[:170]} | {o['ms_per_step']:.2f} | "
              f"{100 * o['share']:.1f}% | {o['ops']} | {o['category']} |" for o in s["sources"]]
    lines += ["", "| op | ms/step | share | calls | category | shape, kind and source |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {o['op'][:40]} | {o['ms_per_step']:.2f} | {100 * o['share']:.1f}% | "
              f"{o['calls']} | {o['category']} | {o['hlo'].replace('|', '/')[:150]} |"
              for o in s["ops"]]
    return "\n".join(lines) + "\n"


def write_report(out: Path, case: str, step_ms: float, steps: int, top: int, device: str,
                 traffic: dict | None = None) -> str:
    """Rank ``out/trace.json.gz`` against ``out/hlo.txt.gz``; write profile.json and profile.md,
    and for a JAX trace gaps.md (against ``traffic``, counted from the HLO if not given)."""
    with gzip.open(out / "trace.json.gz", "rt") as f:
        trace = json.load(f)
    hlo_text = ""  # a torch trace has no HLO: its kernels are named after what they fuse
    if (out / "hlo.txt.gz").is_file():
        with gzip.open(out / "hlo.txt.gz", "rt") as f:
            hlo_text = f.read()
    hlo = hlo_index(hlo_text)
    events = device_events(trace)
    if not events:
        raise SystemExit(f"the trace in {out} holds no GPU kernels: profile on a GPU")
    summary = summarize(events, hlo, steps, top)
    summary.update(case=case, step_ms=step_ms, device=device, steps=steps)
    (out / "profile.json").write_text(json.dumps(summary, indent=2))
    table = markdown(case, step_ms, summary)
    (out / "profile.md").write_text(table)
    if hlo_text:
        write_gaps(out, summary, hlo_text, traffic)
    return table


def write_gaps(out: Path, summary: dict, hlo_text: str, traffic: dict | None = None) -> str:
    """Write ``out/gaps.md``: the profile ``summary`` against the byte floors of the compiled
    HLO (``traffic``, counted from ``hlo_text`` if not given)."""
    table = gaps_markdown(traffic_gaps(summary, traffic or hlo_traffic(hlo_text)))
    (out / "gaps.md").write_text(table)
    return table


def profile_torch(out: Path, args, preset, seq, dtype, extra) -> str:
    """Trace ``args.steps`` steps of a torch case with torch.profiler; rank them (write_report)."""
    import torch
    from torch.profiler import ProfilerActivity

    (out / "hlo.txt.gz").unlink(missing_ok=True)  # a JAX profile's, from an earlier run
    with torch_setup(preset, seq, args.batch, dtype, args.remat, extra,
                     not args.no_compile) as t:
        for _ in range(3):  # compile and warm up
            t.step()
        t.sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if t.cuda else [])
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                t.step()
            t.sync()
        step_ms = (time.perf_counter() - t0) / args.steps * 1e3
        device = t.env.device_name
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(out / "trace.json.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    trace.unlink()
    return write_report(out, args.case, step_ms, args.steps, args.top, device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", help="as in bench_train.py, a JAX case")
    p.add_argument("--summarize", metavar="DIR", help="re-rank DIR/trace.json.gz (a saved "
                   "profile) instead of running a case; --case and --steps describe it")
    p.add_argument("--traffic", metavar="DIR", help="from DIR/hlo.txt.gz alone: the bytes the "
                   "step's memory-bound ops move, ranked (no trace or GPU needed)")
    p.add_argument("--gaps", metavar="DIR", help="from DIR/profile.json and DIR/hlo.txt.gz (a "
                   "saved profile): each memory-bound op's measured time against its byte floor")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="steps traced")
    p.add_argument("--remat", default="none")
    p.add_argument("--no-compile", action="store_true", help="a torch case runs eager")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", default="profile")
    args = p.parse_args(argv)
    if args.traffic:
        if not (Path(args.traffic) / "hlo.txt.gz").is_file():
            raise SystemExit(f"--traffic reads {Path(args.traffic) / 'hlo.txt.gz'}, which is not "
                             "there: point it at a folder a profile run wrote (--out)")
        with gzip.open(Path(args.traffic) / "hlo.txt.gz", "rt") as f:
            table = traffic_markdown(hlo_traffic(f.read()), args.top)
        (Path(args.traffic) / "traffic.md").write_text(table)
        print(table)
        return
    if args.gaps:
        out = Path(args.gaps)
        missing = [n for n in ("profile.json", "hlo.txt.gz") if not (out / n).is_file()]
        if missing:
            raise SystemExit(f"--gaps reads {' and '.join(missing)} in {out}, not there: point "
                             "it at a folder a JAX profile run wrote (--out)")
        with gzip.open(out / "hlo.txt.gz", "rt") as f:
            print(write_gaps(out, json.loads((out / "profile.json").read_text()), f.read()))
        return
    if args.summarize:
        out = Path(args.summarize)
        meta = json.loads((out / "profile.json").read_text()) if (out / "profile.json").exists() \
            else {}
        print(write_report(out, args.case or meta.get("case", "?"), meta.get("step_ms", 0.0),
                           meta.get("steps", args.steps), args.top, meta.get("device", "?")))
        return
    if not args.case:
        p.error("--case is required (or --summarize DIR)")
    framework, preset, seq, dtype, devices, extra = parse_case(args.case)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if framework == "torch":
        if devices != 1:
            raise SystemExit("a torch case is profiled on one GPU; drop the @devices")
        print(profile_torch(out, args, preset, seq, dtype, extra))
        return
    if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_gpu_enable_command_buffer=").strip()
    import jax

    with jax_setup(preset, seq, args.batch, dtype, args.remat, extra, devices) as (
            trainer, state, batch, _):
        compiled = trainer.train_step.lower(state, batch).compile()
        hlo_text = compiled.as_text()
        with gzip.open(out / "hlo.txt.gz", "wt") as f:
            f.write(hlo_text)
        traffic = hlo_traffic(hlo_text)  # counted once: traffic.md, then gaps.md
        (out / "traffic.md").write_text(traffic_markdown(traffic, args.top))
        for _ in range(3):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        trace_dir = out / "trace_tmp"
        shutil.rmtree(trace_dir, ignore_errors=True)
        t0 = time.perf_counter()
        with jax.profiler.trace(str(trace_dir)):
            for _ in range(args.steps):
                state, m = compiled(state, batch)
            jax.block_until_ready(m)
        step_ms = (time.perf_counter() - t0) / args.steps * 1e3
    found = sorted(trace_dir.glob("plugins/profile/*/*.trace.json.gz"))
    if not found:
        raise SystemExit(f"the profiler wrote no trace.json.gz under {trace_dir}")
    shutil.copy(found[-1], out / "trace.json.gz")
    shutil.rmtree(trace_dir, ignore_errors=True)
    print(write_report(out, args.case, step_ms, args.steps, args.top,
                       jax.devices()[0].device_kind, traffic))


if __name__ == "__main__":
    main()
