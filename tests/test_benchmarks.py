"""The benchmark and profiling commands: case parsing, a real (tiny, CPU) benchmark run, and the
profile ranking on a small Chrome trace laid out as jax.profiler writes it on a GPU."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_passes  # noqa: E402
import bench_train  # noqa: E402
import profile_step  # noqa: E402
from swamla.config import load_preset  # noqa: E402
from swamla.flops import attention_flops_per_token  # noqa: E402
from swamla.layout import count_params  # noqa: E402


def test_cases_parse_and_bad_cases_say_how():
    assert bench_train.parse_case("jax:base:2048:bf16") == ("jax", "base", 2048, "bf16", 1, [])
    assert bench_train.parse_case("torch:small:1024:fp8@4+fsdp=true+loss_chunk=0") == (
        "torch", "small", 1024, "fp8", 4, ["fsdp=true", "loss_chunk=0"])
    for bad in ("jax:base:2048", "jax:base:long:bf16", "mxnet:base:2048:bf16",
                "jax:base:2048:fp16", "jax:base:2048:bf16@two"):
        with pytest.raises(SystemExit, match="framework:preset:seq:dtype|framework is jax"):
            bench_train.parse_case(bad)


def test_long_cases_keep_the_tokens_per_step_or_refuse():
    assert bench_train.case_batch(1024, 3) == 3
    assert bench_train.case_batch(8192, 8) == 2  # 8 x 2048 tokens either way
    with pytest.raises(SystemExit, match="multiple of 4"):
        bench_train.case_batch(8192, 2)  # would run half the tokens: refused, not rounded
    with pytest.raises(SystemExit, match="multiple of 4"):  # before any case starts
        bench_train.main(["--cases", "jax:tiny:64:bf16", "jax:small:8192:bf16", "--batch", "2"])


def test_a_tiny_benchmark_runs_and_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    rc = bench_train.main(["--cases", "jax:tiny:64:bf16+scan_layers=true", "jax:nope:64:bf16",
                           "torch:tiny:64:bf16", "--no-compile", "--batch", "2", "--steps", "2",
                           "--out", str(out), "--md", str(md)])
    assert rc == 1  # one case failed
    ok, failed, torch_row = json.loads(out.read_text())
    assert torch_row["framework"] == "torch" and torch_row["rows"] == 2
    assert torch_row["tokens_per_s"] > 0 and torch_row["wrap"] == "none"
    assert ok["case"] == "jax:tiny:64:bf16+scan_layers=true" and ok["devices"] == 1
    assert ok["tokens_per_s"] > 0 and ok["tokens_per_s"] == ok["tokens_per_s_per_gpu"]
    assert ok["rows"] == 2 and ok["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert "unknown preset" in failed["error"]  # a broken case is reported, the rest still run
    table = md.read_text()
    assert "| jax:tiny:64:bf16+scan_layers=true | 1 | 2 |" in table and "failed:" in table


def _fake_case(monkeypatch, outcomes):
    """Cases run as ``outcomes[case]`` says, without a child process: a result row (dict) or
    the last line of a failed child's stderr (str)."""
    import subprocess

    def run(cmd, **kwargs):
        case = cmd[cmd.index("--cases") + 1]
        got = outcomes[case]
        if isinstance(got, dict):
            return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(got), "")
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\n" + got + "\n")

    monkeypatch.setattr(bench_train.subprocess, "run", run)


def test_exit_status_says_whether_every_case_ran(tmp_path, monkeypatch, capsys):
    ok = dict(case="jax:tiny:64:bf16", devices=1, batch=2, tokens_per_s=1e4,
              tokens_per_s_per_gpu=1e4, mfu=None, step_s=0.01, peak_gib=0.0, compile_s=1.0,
              fp8_gemms=0, loss=10.0)
    error = ("swamla.config.ConfigError: unknown preset 'tinyy'; choose one of ['tiny', 'small'] "
             "| or pass a config file path, did you mean 'tiny'? " + "x" * 100)
    _fake_case(monkeypatch, {"jax:tiny:64:bf16": ok, "torch:tinyy:64:bf16": error})
    out, md = str(tmp_path / "b.json"), tmp_path / "b.md"
    assert bench_train.main(["--cases", "jax:tiny:64:bf16", "--out", out]) == 0
    assert "failed" not in capsys.readouterr().err
    assert bench_train.main(["--cases", "torch:tinyy:64:bf16", "--out", out, "--md", str(md)]) == 1
    assert bench_train.main(["--cases", "jax:tiny:64:bf16", "torch:tinyy:64:bf16",
                             "--out", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: 1 of 2 cases failed: torch:tinyy:64:bf16 (see their rows above)"
    # the whole message in the table, its '|' escaped so the row keeps its 12 columns
    (row,) = [line for line in md.read_text().splitlines() if "tinyy" in line]
    assert error.replace("|", "\\|") in row
    assert row.replace("\\|", "").count("|") == 13


def test_the_mfu_the_docstring_states_is_the_one_computed(monkeypatch):
    doc = bench_train.__doc__
    assert "GPU.md" not in doc  # not in this repository: the definition is stated inline
    assert "6 * n_params * tokens/s per GPU / peak" in doc
    assert "989e12 FLOP/s for H100 SXM and H200" in doc and "FP8 cases are measured" in doc

    def fake_run(preset, seq, batch, dtype, steps, remat, extra, devices):
        return dict(rows=batch * devices, step_s=0.5, n_params=100_000_000,
                    device="NVIDIA H200", fp8_gemms=None)

    monkeypatch.setattr(bench_train, "run_jax", fake_run)
    for case in ("jax:small:2048:bf16", "jax:small:2048:fp8@4"):
        r = bench_train.run_case(case, 8, 10, "none", True)
        per_gpu = 8 * 2048 / 0.5
        assert r["tokens_per_s_per_gpu"] == per_gpu
        assert r["mfu"] == pytest.approx(6 * 100_000_000 * per_gpu / 989e12)
        model = load_preset("small", block_size=2048)
        attention = attention_flops_per_token(model, 2048)
        assert attention > 0 and r["mfu_attention"] == pytest.approx(
            (6 * count_params(model) + attention) * per_gpu / 989e12)


def test_a_torch_case_times_the_model_the_trainer_builds():
    """The loss chunking, FP8 and remat settings a torch case times are the trainer's own."""
    from swamla_torch.kernels.fp8 import Fp8Linear

    with bench_train.torch_setup("tiny", 64, 2, "fp8", "full", ["loss_chunk=16"],
                                 compile_model=False) as t:
        raw = t.par.raw
        assert raw.plan.loss_chunk == t.cfg.loss_chunk == 16
        assert raw.plan.remat_policy == "full" and not raw.check_inputs
        assert any(isinstance(m, Fp8Linear) for m in raw.modules())
        assert float(t.step()) > 0


def test_a_case_stopped_by_its_timeout_says_what_it_was_doing(tmp_path):
    assert bench_train.timeout_error(120, None) == (
        "timed out after 120 s while starting (imports, devices)")
    printed = b"STAGE 9 building the model and its state\nnoise\nSTAGE 14 compiling the step\n"
    assert bench_train.timeout_error(120, printed) == (
        "timed out after 120 s while compiling the step (begun at 14 s)")
    out = tmp_path / "bench.json"  # a real case, stopped before it can finish
    bench_train.main(["--cases", "jax:tiny:64:bf16", "--batch", "1", "--steps", "1",
                      "--case-timeout", "1", "--out", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["error"].startswith("timed out after 1 s while "), row


HLO = """\
ENTRY %main {
  %gemm.1 = bf16[16,32]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/mlp/dot_general"}
  %loop_add_fusion.4 = bf16[8,2048]{1,0} fusion(%x, %y), kind=kLoop, calls=%fc, metadata={op_name="jit(step)/transpose(jvp(SWAMLA))/mlp/add_any"}
  %loop_select_fusion = (f32[4]{0}, f32[4]{0}) fusion(%p, %q), kind=kLoop, calls=%fs, metadata={op_name="jit(step)/jit(_where)/select_n"}
  %custom-call.7 = bf16[8,64]{1,0} custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/transpose(jvp(M))/cycles/block_0/ffn/down_proj/dot_general"}
  %custom-call.9 = bf16[8,64]{1,0} custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/transpose(jvp(M))/cycles/block_1/ffn/down_proj/dot_general"}
}
"""


def _kernel(ts, dur, name, op, tid=1):
    """A GPU kernel event as jax.profiler's trace holds it."""
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
            "args": {"hlo_op": op}}


def _profile(out, events, step_ms=0.0, steps=1, device="GPU"):
    """Write a trace of ``events`` (and HLO) where profile_step.py saves them, then rank it."""
    meta = [{"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
    with gzip.open(out / "trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    with gzip.open(out / "hlo.txt.gz", "wt") as f:
        f.write(HLO)
    table = profile_step.write_report(out, "jax:tiny:64:bf16", step_ms, steps, 10, device)
    return table, json.loads((out / "profile.json").read_text())


def test_pass_candidates_compute_the_models_function():
    """A candidate that computed something else could only look fast: each must give the model
    form's outputs and input gradients (float32 to rounding; the packed RoPE, bf16 only, to the
    bit)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def value_and_grad(fn, x, dy):
        y, vjp = jax.vjp(fn, x)
        return np.asarray(y, np.float32), np.asarray(vjp(dy)[0], np.float32)

    key = jax.random.split(jax.random.PRNGKey(0), 4)
    gu = 3 * jax.random.normal(key[0], (2, 5, 2, 8))
    dh = jax.random.normal(key[1], (2, 5, 8))
    want = value_and_grad(bench_passes.SWIGLU[0][1], gu, dh)
    for name, fn in bench_passes.SWIGLU[1:]:
        for got, ref in zip(value_and_grad(fn, gu, dh), want):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=name)

    x = 4 * jax.random.normal(key[2], (2, 6, 3, 8))
    dy = jax.random.normal(key[3], x.shape)
    cos, sin = bench_passes.layers.rope_tables(8, jnp.arange(6), 1e4, 1.0)
    model = bench_passes.ROPE[0][1]
    for name, fn in bench_passes.ROPE[1:]:
        dtype = jnp.bfloat16 if name.startswith("packed") else jnp.float32
        xs, dys = x.astype(dtype), dy.astype(dtype)
        got = value_and_grad(lambda v, fn=fn: fn(v, cos, sin), xs, dys)
        ref = value_and_grad(lambda v: model(v, cos, sin), xs, dys)
        for g, r in zip(got, ref):
            if dtype == jnp.bfloat16:
                np.testing.assert_array_equal(g, r, err_msg=name)
            else:
                np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6, err_msg=name)


def test_the_pass_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "passes.json"
    bench_passes.main(["--preset", "tiny", "--batch", "1", "--seq", "32", "--iters", "1",
                       "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * (len(bench_passes.SWIGLU) + len(bench_passes.ROPE))
    assert all(r["ms"] > 0 and r["bytes"] > 0 for r in rows)


def test_profile_ranks_kernels_by_op_and_category(tmp_path):
    kernel = _kernel
    events = [
        kernel(0, 30, "nvjet_sm90_tst_256x128", "gemm.1"),
        kernel(40, 10, "loop_add_fusion_4", "command_buffer_9"),  # attributed by kernel name
        kernel(45, 10, "loop_add_fusion_4", "command_buffer_9", tid=2),  # overlaps on a 2nd stream
        kernel(60, 5, "loop_select_fusion", "loop_select_fusion"),
        kernel(70, 20, "nvjet_sm90_tst_256x128", "gemm.1"),
        {"ph": "X", "pid": 7, "tid": 3, "ts": 0, "dur": 999, "name": "python host work"},
    ]
    table, s = _profile(tmp_path, events, step_ms=12.5, steps=2)
    assert s["kernel_ms_per_step"] == pytest.approx(75 / 2 / 1e3)  # host events left out
    assert s["busy_ms_per_step"] == pytest.approx(70 / 2 / 1e3)  # 40..55 counted once
    assert [o["op"] for o in s["ops"]] == ["gemm.1", "loop_add_fusion_4", "loop_select_fusion"]
    gemm, add, select = s["ops"]
    assert gemm["calls"] == 1 and gemm["category"] == "GEMM" and "mlp/dot_general" in gemm["hlo"]
    assert add["category"] == "elementwise fusion" and "add_any" in add["hlo"]
    assert select["hlo"].startswith("(f32[4]{0}, f32[4]{0})") and "select_n" in select["hlo"]
    assert {c["category"] for c in s["categories"]} == {"GEMM", "elementwise fusion"}
    assert "| gemm.1 | 0.03 | 66.7% | 1 | GEMM |" in table
    assert (tmp_path / "profile.md").read_text() == table


def test_profile_merges_the_layers_and_names_an_op_by_most_of_its_time(tmp_path):
    kernel = _kernel
    events = [  # each layer's GEMM starts with a workspace memset, as cuBLASLt calls do
        kernel(0, 1, "Memset", "custom-call.7"), kernel(1, 10, "nvjet_sm90_tst", "custom-call.7"),
        kernel(20, 1, "Memset", "custom-call.9"), kernel(21, 12, "nvjet_sm90_tst", "custom-call.9"),
        kernel(40, 15, "loop_add_fusion_4", "loop_add_fusion.4"),
    ]
    table, s = _profile(tmp_path, events)
    assert [o["category"] for o in s["ops"]] == ["elementwise fusion", "GEMM", "GEMM"]
    top = s["sources"][0]  # the two layers' down_proj GEMMs, 24 us, above the 15 us add
    assert top["ops"] == 2 and top["category"] == "GEMM"
    assert top["ms_per_step"] == pytest.approx(24 / 1e3)
    assert "block_*/ffn/down_proj" in top["source"] and "block_0" not in top["source"]
    assert "Layers merged" in table


TRAFFIC_HLO = """\
HloModule step
%loop_body (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %inner = f32[8]{0} add(%p, %p)
}
ENTRY %main (a: bf16[8,1024], w: bf16[1024,1024]) -> bf16[8,1024] {
  %a = bf16[8,1024]{1,0} parameter(0)
  %w = bf16[1024,1024]{1,0} parameter(1)
  %gemm.1 = bf16[8,1024]{1,0} custom-call(%a, %w), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/block_0/mlp/dot_general"}
  %add_fusion.0 = bf16[8,1024]{1,0} fusion(%gemm.1, %a), kind=kLoop, calls=%f0, metadata={op_name="jit(step)/block_0/add"}
  %add_fusion.1 = bf16[8,1024]{1,0} fusion(%add_fusion.0, %a), kind=kLoop, calls=%f1, metadata={op_name="jit(step)/block_1/add"}
  ROOT %norm = f32[8]{0} fusion(%add_fusion.1), kind=kInput, calls=%f2, metadata={op_name="jit(step)/ln_f/reduce_sum"}
}
"""


def test_traffic_counts_the_bytes_of_memory_bound_ops_only(tmp_path, capsys):
    t = profile_step.hlo_traffic(TRAFFIC_HLO)
    act = 8 * 1024 * 2  # one bf16[8, 1024]
    adds, norm = t["ops"]  # the GEMM, the parameters and the loop body are not counted
    assert adds["ops"] == 2 and adds["bytes"] == 2 * 3 * act  # two reads and a write, per layer
    assert "block_*/add" in adds["source"]
    assert norm["bytes"] == act + 8 * 4
    assert t["bytes"] == adds["bytes"] + norm["bytes"]
    assert t["ms_at_hbm"] == pytest.approx(t["bytes"] / profile_step.HBM_BYTES_PER_S * 1e3)
    with gzip.open(tmp_path / "hlo.txt.gz", "wt") as f:
        f.write(TRAFFIC_HLO)
    profile_step.main(["--traffic", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "ms at 3.0 TB/s" in printed and "| HLO ops |" in printed
    assert (tmp_path / "traffic.md").read_text() == printed.rstrip("\n") + "\n"
    with pytest.raises(SystemExit, match="not there"):
        profile_step.main(["--traffic", str(tmp_path / "missing")])


SLICING_HLO = """\
HloModule step
%one_layer (p0: f32[8,64,32]) -> bf16[64,32] {
  %p0 = f32[8,64,32]{2,1,0} parameter(0)
  %c = bf16[8,64,32]{2,1,0} convert(%p0)
  %s = bf16[1,64,32]{2,1,0} slice(%c), slice={[3:4], [0:64], [0:32]}
  ROOT %b = bf16[64,32]{1,0} bitcast(%s)
}
%whole (p0: f32[8,64,32]) -> bf16[8,64,32] {
  %p0 = f32[8,64,32]{2,1,0} parameter(0)
  ROOT %c = bf16[8,64,32]{2,1,0} convert(%p0)
}
%in_place (p0: bf16[4,1024], p1: bf16[4,16], i: s32[]) -> bf16[4,1024] {
  %p0 = bf16[4,1024]{1,0} parameter(0)
  %p1 = bf16[4,16]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %d = bf16[4,1024]{1,0} dynamic-update-slice(%p0, %p1, %z, %i)
}
ENTRY %main (w: f32[8,64,32], a: bf16[4,1024], u: bf16[4,16], i: s32[]) -> bf16[64,32] {
  %w = f32[8,64,32]{2,1,0} parameter(0)
  %a = bf16[4,1024]{1,0} parameter(1)
  %u = bf16[4,16]{1,0} parameter(2)
  %i = s32[] parameter(3)
  %layer = bf16[64,32]{1,0} fusion(%w), kind=kLoop, calls=%one_layer, metadata={op_name="jit(step)/layer"}
  %all = bf16[8,64,32]{2,1,0} fusion(%w), kind=kLoop, calls=%whole, metadata={op_name="jit(step)/all"}
  ROOT %upd = bf16[4,1024]{1,0} fusion(%a, %u, %i), kind=kLoop, calls=%in_place, metadata={op_name="jit(step)/upd"}
}
"""


def test_gaps_set_each_memory_bound_op_against_its_byte_floor(tmp_path, capsys):
    """The add fusions (two layers, one source row) ran 40 us for 98 KB; the norm 1 us: the adds
    come first, by the time above their floor; the GEMM, not memory-bound, is not a row."""
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
    events = [_kernel(0, 50, "nvjet_sm90_tst", "gemm.1"),
              _kernel(60, 20, "loop_add_fusion", "add_fusion.0"),
              _kernel(90, 20, "loop_add_fusion", "add_fusion.1"),
              _kernel(120, 1, "input_reduce_fusion", "norm")]
    with gzip.open(tmp_path / "trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    with gzip.open(tmp_path / "hlo.txt.gz", "wt") as f:
        f.write(TRAFFIC_HLO)
    profile_step.write_report(tmp_path, "jax:tiny:64:bf16", 0.0, 1, 10, "GPU")
    written = (tmp_path / "gaps.md").read_text()
    profile_step.main(["--gaps", str(tmp_path)])
    assert capsys.readouterr().out.rstrip("\n") + "\n" == written

    g = profile_step.traffic_gaps(json.loads((tmp_path / "profile.json").read_text()),
                                  profile_step.hlo_traffic(TRAFFIC_HLO))
    adds, norm = g["rows"]
    act = 8 * 1024 * 2
    floor = 2 * 3 * act / profile_step.HBM_BYTES_PER_S * 1e3
    assert "block_*/add" in adds["source"] and adds["ops"] == 2
    assert adds["ms_per_step"] == pytest.approx(0.040)
    assert adds["floor_ms"] == pytest.approx(floor)
    assert adds["above_floor_ms"] == pytest.approx(0.040 - floor)
    assert adds["gb_per_s"] == pytest.approx(2 * 3 * act / 40e-6 / 1e9)
    assert "ln_f/reduce_sum" in norm["source"]
    assert g["ms_per_step"] == pytest.approx(0.041)
    assert "| above floor |" in written


def test_gaps_need_a_saved_jax_profile(tmp_path):
    with pytest.raises(SystemExit, match="profile.json and hlo.txt.gz"):
        profile_step.main(["--gaps", str(tmp_path)])


def test_traffic_counts_slices_and_in_place_updates_not_whole_buffers():
    """A fusion reading one layer of a stacked parameter (through a convert) reads that layer; an
    in-place dynamic-update-slice writes the update; a fusion using the whole operand reads it."""
    ops = {o["source"].split("| ")[-1]: o["bytes"]
           for o in profile_step.hlo_traffic(SLICING_HLO)["ops"]}
    assert ops["layer"] == 64 * 32 * 4 + 64 * 32 * 2  # one f32 layer read, bf16 written
    assert ops["all"] == 8 * 64 * 32 * (4 + 2)
    assert ops["upd"] == 4 * 16 * 2 * 2 + 4  # the update read and written, and the index


def test_profile_ranks_a_torch_trace_by_kernel(tmp_path):
    """torch.profiler's trace: GPU kernels by category, no HLO; CPU ops left out."""
    events = [{**_kernel(0, 30, "nvjet_sm90_tst_256x128", "-"), "cat": "kernel", "pid": 0},
              {**_kernel(30, 10, "triton_poi_fused_add_mul_0", "-"), "cat": "kernel", "pid": 0},
              {**_kernel(40, 4, "triton_red_fused_pow_sum_1", "-"), "cat": "kernel", "pid": 0},
              {**_kernel(44, 2, "triton_per_fused__to_copy_add_mean_2", "-"), "cat": "kernel",
               "pid": 0},  # a reduction whose fused ops include a dtype copy
              {**_kernel(46, 20, "triton_tem_fused_2", "-"), "cat": "kernel", "pid": 0},
              {**_kernel(66, 2, "Memset (Device)", "-"), "cat": "gpu_memset", "pid": 0},
              {**_kernel(0, 500, "aten::mm", "-"), "cat": "cpu_op", "pid": 0}]
    for e in events:
        del e["args"]  # torch's events carry no HLO op
    out = tmp_path / "prof"
    out.mkdir()
    with gzip.open(out / "trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    profile_step.write_report(out, "torch:tiny:64:bf16", 0.0, 1, 10, "GPU")
    s = json.loads((out / "profile.json").read_text())
    assert s["kernel_ms_per_step"] == pytest.approx(68 / 1e3)  # the CPU op is not a kernel
    cats = {c["category"]: c["ms_per_step"] * 1e3 for c in s["categories"]}
    assert cats == pytest.approx({"GEMM": 30, "elementwise fusion": 10, "reduction": 6,
                                  "Triton template (flex attention, GEMM)": 20,
                                  "copy/transpose": 2})


def test_a_torch_case_is_traced_and_needs_a_gpu_to_rank(tmp_path):
    """The whole torch path runs on CPU (setup, warm-up, torch.profiler, trace export); ranking
    then says that a CPU trace holds no GPU kernels."""
    with pytest.raises(SystemExit, match="no GPU kernels"):
        profile_step.main(["--case", "torch:tiny:64:bf16", "--batch", "2", "--steps", "1",
                           "--no-compile", "--out", str(tmp_path)])
    with gzip.open(tmp_path / "trace.json.gz", "rt") as f:
        assert any(e.get("cat") == "cpu_op" for e in json.load(f)["traceEvents"])
    with pytest.raises(SystemExit, match="one GPU"):
        profile_step.main(["--case", "torch:tiny:64:bf16@2", "--out", str(tmp_path)])


def test_profile_of_a_trace_without_gpu_kernels_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no GPU kernels"):
        _profile(tmp_path, [], device="cpu")
