"""PyTorch FP8 linears (torch._scaled_mm, current scaling) against bf16, on CPU and in a run."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import swamla_torch as st  # noqa: E402
from swamla.config import load_preset  # noqa: E402
from swamla.plan import ComputePlan  # noqa: E402
from swamla_torch.kernels.fp8 import Fp8Linear  # noqa: E402


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


def test_fp8_linear_matches_linear_within_fp8_error():
    torch.manual_seed(0)
    ref = torch.nn.Linear(64, 48, bias=True)
    fp8 = torch.nn.Linear(64, 48, bias=True)
    fp8.load_state_dict(ref.state_dict())
    fp8.__class__ = Fp8Linear
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    x8 = x.detach().clone().requires_grad_(True)
    y_ref = ref(x.float())
    y8 = fp8(x8)
    assert y8.dtype == torch.bfloat16 and rel(y8, y_ref) < 0.08  # e4m3: 3 mantissa bits
    cot = torch.randn_like(y_ref)
    (y_ref * cot).sum().backward()
    (y8.float() * cot).sum().backward()
    assert rel(x8.grad, x.grad) < 0.15 and rel(fp8.weight.grad, ref.weight.grad) < 0.15
    assert fp8.weight.grad.dtype == torch.float32


def test_model_with_fp8_linears_trains_close_to_bf16():
    cfg = load_preset("tiny", n_layer=3)
    ref = st.from_config(cfg, seed=0)
    model = st.from_config(cfg, seed=0, plan=ComputePlan(compute_dtype="bfloat16", fp8=True))
    n = sum(isinstance(m, Fp8Linear) for m in model.modules())
    assert n >= 10 and set(model.state_dict()) == set(ref.state_dict())  # names unchanged
    idx = torch.from_numpy(np.random.default_rng(0).integers(0, 1000, (2, 40)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss8 = model(idx, idx)[1]
        loss = ref(idx, idx)[1]
    loss8.backward()
    assert abs(loss8.item() - loss.item()) < 0.02 * loss.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_torch_trainer_runs_with_use_fp8(tmp_path):
    from swamla.data.synthetic import write_synthetic_shards
    from swamla.metrics import read_metrics
    from swamla.train_config import parse_args
    from swamla_torch.train import train

    shards = write_synthetic_shards(tmp_path / "shards", n_docs=200)
    out = tmp_path / "run"
    train(parse_args(["--size", "tiny", "--n_layer", "3", "--block_size", "32", "--batch_size",
                      "4", "--source", "shards", "--train_paths", str(shards), "--max_iters", "25",
                      "--warmup_iters", "2", "--learning_rate", "3e-3", "--log_interval", "1",
                      "--eval_interval", "1000", "--use_fp8", "--no-progress_bar",
                      "--output_dir", str(out)]))
    curve = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert np.mean(curve[-3:]) < np.mean(curve[:3]) - 1.0, curve
