"""The framework-free core: it imports no backend, its parameter table matches the SPEC presets,
and the compute plan resolves ``auto`` and refuses what cannot run, for both backends."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from swamla.config import BlockKind, ConfigError, load_preset
from swamla.layout import block_tensors, count_params, expected_shapes, layer_location
from swamla.plan import ComputePlan, resolve_plan
from swamla.portable import detect_format, is_jax_checkpoint, is_torch_checkpoint


def test_core_imports_no_backend():
    code = ("import importlib, pkgutil, sys, swamla\n"
            "for m in pkgutil.walk_packages(swamla.__path__, 'swamla.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(k for k in ('jax', 'flax', 'torch', 'swamla_jax', 'swamla_torch')"
            " if k in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_layout_table():
    cfg = load_preset("tiny").replace(q_lora_rank=24, mla_norm="layernorm", bias=True)
    shapes = expected_shapes(cfg)
    mla = next(i for i, k in enumerate(cfg.block_kinds) if k is BlockKind.MLA)
    assert shapes[f"transformer.h.{mla}.attn.q_norm.bias"] == (24,)
    assert shapes[f"transformer.h.{mla}.attn.wkv_b.weight"] == (
        cfg.n_head * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    assert set(block_tensors(cfg, BlockKind.SWA)) >= {"norm1.weight", "mlp.down_proj.bias"}
    assert count_params(cfg) == sum(math.prod(s) for s in shapes.values())
    small = load_preset("small")  # 12 layers, cycle of 3: 4 stacked repeats, no remainder
    assert layer_location(small, 7) == ("cycles/block_1", 2)
    odd = small.replace(n_layer=13)
    assert layer_location(odd, 12) == ("h_12", None)


def test_plan_resolves_auto_per_backend():
    gpu16 = dict(on_gpu=True, compute_dtype="bfloat16")
    assert resolve_plan("jax", **gpu16).attention_impl == "cudnn"
    assert resolve_plan("torch", **gpu16).attention_impl == "flex"
    assert resolve_plan("jax", **gpu16).mlp_impl == "pallas"
    assert resolve_plan("jax", **gpu16, fp8=True).mlp_impl == "xla"  # FP8 rounds its own halves
    assert resolve_plan("jax", **gpu16, dropout=0.1).attention_impl == "reference"
    assert resolve_plan("jax", on_gpu=False, compute_dtype="bfloat16") == ComputePlan(
        compute_dtype="bfloat16")
    assert resolve_plan("jax", on_gpu=True) == ComputePlan()  # float32: the exact reference
    fused = resolve_plan("jax", on_gpu=True, fuse_projections=True, tensor_parallel=True)
    assert not fused.fuse_projections  # fused GEMMs would interleave tensor-parallel shards
    torch_plan = resolve_plan("torch", on_gpu=True, fuse_projections=True, scan_layers=True)
    assert not torch_plan.fuse_projections and not torch_plan.scan_layers


@pytest.mark.parametrize("backend, kwargs, message", [
    ("jax", dict(attention_impl="flex"), "attention_impl must be one of auto, reference, cudnn"),
    ("torch", dict(attention_impl="cudnn"), "attention_impl must be one of auto, reference, flex"),
    ("jax", dict(attention_impl="cudnn"), "'cudnn' needs compute_dtype 'bfloat16'"),
    ("jax", dict(attention_impl="cudnn", compute_dtype="bfloat16", dropout=0.1),
     "needs dropout 0"),
    ("torch", dict(mlp_impl="pallas"), "'pallas' is JAX's kernel"),
    ("jax", dict(mlp_impl="triton"), "mlp_impl must be one of auto, xla, pallas"),
    ("jax", dict(fp8=True), "use_fp8 needs compute_dtype 'bfloat16'"),
    ("jax", dict(remat_policy="some"), "remat_policy must be one of"),
    ("jax", dict(loss_chunk=-1), "loss_chunk must be an integer >= 0"),
])
def test_plan_refuses_what_cannot_run(backend, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        resolve_plan(backend, on_gpu=True, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention_impl="auto"), "attention_impl must be one of reference, cudnn, flex"),
    (dict(mlp_impl="triton"), "mlp_impl must be one of xla, pallas"),
    (dict(fp8=True), "use_fp8 needs compute_dtype 'bfloat16'"),
    (dict(loss_chunk=True), "loss_chunk must be an integer"),
])
def test_a_plan_holds_only_concrete_choices(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ComputePlan(**kwargs)


def test_format_detection_without_a_backend(tmp_path):
    torch = pytest.importorskip("torch")
    pt = tmp_path / "model.pt"
    torch.save({"config": {"n_layer": 1}, "model": {"w": torch.zeros(2)}}, pt)
    assert is_torch_checkpoint(pt) and detect_format(pt) == "torch"
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    assert not is_torch_checkpoint(other)
    (tmp_path / "text.pt").write_text("not a zip")
    assert not is_torch_checkpoint(tmp_path / "text.pt")
    jax_dir = tmp_path / "jax"
    (jax_dir / "params").mkdir(parents=True)
    (jax_dir / "config.json").write_text("{}")
    assert is_jax_checkpoint(jax_dir) and detect_format(jax_dir) == "jax"
