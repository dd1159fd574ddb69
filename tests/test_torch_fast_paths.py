"""The PyTorch speed paths against the float32 reference path: FlexAttention for SWA + sink,
SDPA for MLA, the bf16 model, and FP8 linears through ``torch._scaled_mm``.

Most need the CUDA kernels themselves and skip without a GPU; the CPU tests elsewhere check the
math of the same code (reference attention, the FP8 recipe with CPU ``_scaled_mm``).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import swamla_torch as st
from swamla.config import load_preset
from swamla.plan import resolve_plan
from swamla_torch.attention import attention


def gpu(test):
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return skip(pytest.mark.gpu(test))


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def _attention_and_grads(q, k, v, cot, impl, dtype, **mask):
    ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = attention(*ins, scale=q.shape[-1] ** -0.5, impl=impl, **mask)
    (out.float() * cot).sum().backward()
    return out, [t.grad for t in ins]


# Windows that are not a multiple of FlexAttention's 128-wide tiles put the window edge inside a
# tile, where the block mask must fall back to the element mask; an off-by-one there (i - j <=
# window) changes one key per row: 0.08-0.16 relative error here, against bf16's ~0.005.
@gpu
@pytest.mark.parametrize("window,sink,kv_heads", [(256, 4, 8), (200, 4, 2), (130, 0, 8)])
def test_flex_swa_matches_reference(window, sink, kv_heads):
    g = torch.Generator().manual_seed(window)
    B, T, H, D = 2, 1024, 8, 64
    q = torch.randn(B, T, H, D, generator=g).cuda()
    k, v = (torch.randn(B, T, kv_heads, D, generator=g).cuda() for _ in range(2))
    cot = torch.randn(B, T, H, D, generator=g).cuda()
    fast, g_fast = _attention_and_grads(q, k, v, cot, "flex", torch.bfloat16, window=window,
                                        sink=sink)
    ref, g_ref = _attention_and_grads(q, k, v, cot, "reference", torch.float32, window=window,
                                      sink=sink)
    assert fast.dtype == torch.bfloat16 and rel(fast, ref) < 2e-2
    for name, a, b in zip("qkv", g_fast, g_ref):
        assert rel(a, b) < 3e-2, name
    shifted = attention(q, k, v, scale=D ** -0.5, window=window + 1, sink=sink)
    assert rel(shifted, ref) > 0.05  # the output check above tells the window off by one


@gpu
def test_sdpa_mla_matches_reference():
    """MLA's shapes: qk 192 (nope 128 + rope 64), v 128, causal, no window."""
    g = torch.Generator().manual_seed(5)
    B, T, H = 2, 1024, 8
    q, k = (torch.randn(B, T, H, 192, generator=g).cuda() for _ in range(2))
    v = torch.randn(B, T, H, 128, generator=g).cuda()
    cot = torch.randn(B, T, H, 128, generator=g).cuda()
    fast, g_fast = _attention_and_grads(q, k, v, cot, "flex", torch.bfloat16)
    ref, g_ref = _attention_and_grads(q, k, v, cot, "reference", torch.float32)
    assert rel(fast, ref) < 2e-2
    for name, a, b in zip("qkv", g_fast, g_ref):
        assert rel(a, b) < 3e-2, name


@gpu
def test_bf16_model_logits_match_float32():
    """Mean per-token KL(p_fp32 || p_bf16) <= 1e-3, the fast kernels against the reference."""
    cfg = load_preset("tiny", n_embd=256, n_head=4, n_layer=6, block_size=1024, swa_window=256)
    model = st.from_config(cfg, seed=0).cuda().eval()
    # as the trainer runs it: float32 parameters, bfloat16 autocast, the fast kernels
    plan = resolve_plan("torch", on_gpu=True, compute_dtype="bfloat16")
    assert plan.attention_impl == "flex"
    fast = st.from_config(cfg, seed=0, plan=plan).cuda().eval()
    idx = torch.from_numpy(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 1024))).cuda()
    with torch.no_grad():
        lp32 = torch.log_softmax(model(idx)[0].float(), -1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp16 = torch.log_softmax(fast(idx)[0].float(), -1)
    kl = (lp32.exp() * (lp32 - lp16)).sum(-1).mean()
    assert float(kl) <= 1e-3


@gpu
def test_fp8_linear_runs_the_fp8_gemm_and_matches():
    """On the GPU the FP8 linear's three matmuls are ``_scaled_mm`` calls on float8 operands."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from swamla_torch.kernels.fp8 import Fp8Linear

    class ScaledMMs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._scaled_mm.default:
                self.dtypes.append((args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    ref = torch.nn.Linear(256, 512, bias=False).cuda()
    fp8 = torch.nn.Linear(256, 512, bias=False).cuda()
    fp8.load_state_dict(ref.state_dict())
    fp8.__class__ = Fp8Linear
    x = torch.randn(4, 128, 256, device="cuda")
    cot = torch.randn(4, 128, 512, device="cuda")
    x8, xr = x.to(torch.bfloat16).requires_grad_(True), x.clone().requires_grad_(True)
    with ScaledMMs() as seen:
        y8 = fp8(x8)
        (y8.float() * cot).sum().backward()
    yr = ref(xr)
    (yr * cot).sum().backward()
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    assert sorted(seen.dtypes, key=str) == sorted([(e4, e4), (e5, e4), (e5, e4)], key=str)
    assert rel(y8, yr) < 0.08 and rel(x8.grad, xr.grad) < 0.15
    assert rel(fp8.weight.grad, ref.weight.grad) < 0.15


@gpu
def test_compiled_fp8_training_tracks_bf16(fp8_and_bf16_runs):
    """200 compiled steps of FP8 training end within 2% of the bf16 run's loss (same data, init)."""
    from swamla_torch.train import train

    runs = fp8_and_bf16_runs(train, "--compile")
    for name, (first, last) in runs.items():
        assert last < first - 1.0, (name, first, last)
    final = {name: last for name, (_, last) in runs.items()}
    assert abs(final["fp8"] - final["bf16"]) <= 0.02 * final["bf16"], final


@pytest.mark.parametrize("window", [24, 25])
def test_compiled_model_with_flex_matches_reference(window):
    """The compiled model builds FlexAttention's block mask inside its graph (a separate branch
    from eager calls): its logits match the float32 reference, and not a window one wider.
    FlexAttention's forward runs on CPU; its backward needs a GPU."""
    cfg = load_preset("tiny", n_layer=3, block_size=128, swa_window=window)
    model = st.from_config(cfg, seed=0).eval()
    wider = st.from_config(cfg.replace(swa_window=window + 1), seed=0).eval()
    plan = resolve_plan("torch", on_gpu=False, compute_dtype="bfloat16", attention_impl="flex")
    flex = st.from_config(cfg, seed=0, plan=plan).eval()
    idx = torch.from_numpy(np.random.default_rng(window).integers(0, cfg.vocab_size, (2, 128)))
    with torch.no_grad():
        ref, off_by_one = model(idx)[0], wider(idx)[0]
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = torch.compile(flex)(idx)[0]
    assert rel(fast, ref) < 1.5e-2  # bf16: ~0.005
    assert rel(off_by_one, ref) > 3e-2  # ~0.04: the check above tells a window off by one
