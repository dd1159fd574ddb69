"""Packed rows with document masking (SPEC 3.3): every document of a packed row computes what it
computes alone, in both backends, on the reference and the fast attention paths.

The tiny preset's window is 32 and its sink 4; the packings put documents shorter than the sink,
shorter than the window, longer than the window (so their own sinks matter) and one spanning the
whole row into rows of SEQ tokens.
"""

import jax
import numpy as np
import pytest
import torch

import swamla_jax as sj
import swamla_torch as st
from parity_helpers import (LOGIT_RTOL, SEQ, assert_rel_close, perturbed_torch_model,
                            port_to_jax, tiny_config)
from swamla.data.packing import document_targets, segment_ids
from swamla.plan import REFERENCE_PLAN, ComputePlan

pytestmark = pytest.mark.parity

EOS = 5

# Lengths of the documents of each row, EOS included; a row holds SEQ inputs plus one target.
PACKINGS = {
    "short_and_long": [[3, 2, 10, 30, 36], [45, 1, 4, 31]],
    "long_then_cut": [[70, 11], [33, 48]],
    "whole_row": [[SEQ + 1], [SEQ + 1]],
}


def packed_rows(lengths, vocab: int, seed: int):
    """(inputs, targets, segment ids) of rows of documents of these lengths (each a run of random
    non-EOS tokens closed by EOS; the last one cut at the row's end)."""
    rng = np.random.default_rng(seed)
    rows = []
    for row in lengths:
        docs = [np.append(rng.integers(EOS + 1, vocab, n - 1), EOS) for n in row]
        rows.append(np.concatenate(docs)[:SEQ + 1])
    rows = np.stack(rows)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    return inputs, document_targets(inputs, targets, EOS), segment_ids(inputs, EOS)


def documents(segments_row):
    """(start, end) of each document of one row of segment ids."""
    edges = np.flatnonzero(np.diff(segments_row)) + 1
    return list(zip(np.r_[0, edges], np.r_[edges, len(segments_row)]))


def assert_packed_equals_alone(run, inputs, targets, segs, tol=LOGIT_RTOL):
    """``run(inputs, targets, segment_ids)`` -> (logits, loss) as numpy; the packed rows' logits
    equal each document's alone and the packed loss is the documents' token-weighted loss.

    The documents run alone as one batch, each from position 0 and followed by padding whose
    targets are -100: causal attention keeps the padding out of their logits."""
    spans = [(b, s, e) for b in range(inputs.shape[0]) for s, e in documents(segs[b])]
    alone = np.full((len(spans), SEQ), EOS, inputs.dtype)
    alone_targets = np.full((len(spans), SEQ), -100, targets.dtype)
    for r, (b, s, e) in enumerate(spans):
        alone[r, :e - s], alone_targets[r, :e - s] = inputs[b, s:e], targets[b, s:e]
    logits, loss = run(inputs, targets, segs)
    alone_logits, alone_loss = run(alone, alone_targets, None)
    for r, (b, s, e) in enumerate(spans):
        assert_rel_close(logits[b, s:e], alone_logits[r, :e - s], tol, f"row {b} document {s}:{e}")
    assert abs(loss - alone_loss) <= tol * abs(alone_loss), "loss"
    return logits


def torch_run(model):
    def run(inputs, targets, segs):
        with torch.no_grad():
            logits, loss = model(torch.from_numpy(inputs), torch.from_numpy(targets),
                                 None if segs is None else torch.from_numpy(segs))
        return logits.numpy(), float(loss)
    return run


def jax_run(jm, plan=REFERENCE_PLAN):
    apply = jax.jit(sj.SWAMLA(jm.config, plan).apply)

    def run(inputs, targets, segs):
        logits, loss = apply({"params": jm.params}, inputs, targets, segment_ids=segs)
        return np.asarray(logits), float(loss)
    return run


@pytest.mark.parametrize("packing, seed", [("short_and_long", 0), ("long_then_cut", 1),
                                           ("whole_row", 2)])
def test_packed_documents_compute_what_they_compute_alone(packing, seed):
    cfg = tiny_config()
    tm = perturbed_torch_model(cfg, seed)
    jm = port_to_jax(tm)
    inputs, targets, segs = packed_rows(PACKINGS[packing], cfg.vocab_size, seed)
    t_logits = assert_packed_equals_alone(torch_run(tm), inputs, targets, segs)
    j_logits = assert_packed_equals_alone(jax_run(jm), inputs, targets, segs)
    assert_rel_close(j_logits, t_logits, LOGIT_RTOL, "JAX vs PyTorch")


def test_random_packings_with_grouped_heads_and_logit_scale():
    """Random document lengths, with the options that read positions (log-scaling) or heads."""
    cfg = tiny_config(ratio_kv=2, logit_scale_base=3.0, logit_scale_window=16)
    rng = np.random.default_rng(7)
    lengths = [list(rng.integers(1, 40, 12)) for _ in range(2)]
    tm = perturbed_torch_model(cfg, 3)
    inputs, targets, segs = packed_rows(lengths, cfg.vocab_size, 3)
    t_logits = assert_packed_equals_alone(torch_run(tm), inputs, targets, segs)
    j_logits = assert_packed_equals_alone(jax_run(port_to_jax(tm)), inputs, targets, segs)
    assert_rel_close(j_logits, t_logits, LOGIT_RTOL, "JAX vs PyTorch")


def test_one_document_is_the_plain_row():
    """A row that is one document computes exactly what it computes without segment ids."""
    cfg = tiny_config()
    tm = perturbed_torch_model(cfg, 0)
    inputs, targets, segs = packed_rows(PACKINGS["whole_row"], cfg.vocab_size, 0)
    run = torch_run(tm)
    assert np.array_equal(run(inputs, targets, segs)[0], run(inputs, targets, None)[0])


def test_document_targets_keep_the_eos_and_drop_the_crossing():
    inputs = np.array([[9, 8, EOS, 7, 6, EOS, 4]])
    targets = np.array([[8, EOS, 7, 6, EOS, 4, 3]])
    assert document_targets(inputs, targets, EOS).tolist() == [[8, EOS, -100, 6, EOS, -100, 3]]


def test_jax_fast_path_matches_reference():
    """The fast attention plan (blocked SWA in XLA, Pallas flash attention for MLA, run in its
    interpreter here) on packed rows equals the reference model."""
    cfg = tiny_config(n_layer=3)
    jm = port_to_jax(perturbed_torch_model(cfg, 4))
    inputs, targets, segs = packed_rows(PACKINGS["long_then_cut"], cfg.vocab_size, 4)
    fast = sj.ComputePlan(attention_impl="cudnn")
    ref_logits, ref_loss = jax_run(jm)(inputs, targets, segs)
    logits, loss = jax_run(jm, fast)(inputs, targets, segs)
    assert_rel_close(logits, ref_logits, LOGIT_RTOL, "logits")
    def grads(plan):
        loss = lambda p: sj.SWAMLA(cfg, plan).apply(  # noqa: E731
            {"params": p}, inputs, targets, segment_ids=segs)[1]
        return sj.to_portable_tensors(cfg, jax.jit(jax.grad(loss))(jm.params))

    ref_grads, fast_grads = grads(sj.ComputePlan()), grads(fast)
    for name, g in ref_grads.items():
        assert_rel_close(fast_grads[name], g, 1e-4, name)


@pytest.mark.parametrize("window, sink", [(8, 3), (5, 0), (16, 4), (64, 2)])
def test_blocked_swa_kernel_matches_the_reference(window, sink):
    """The JAX blocked SWA over random documents (longer than the window by several blocks, so
    sinks lie blocks away), with gradients, at float32 precision."""
    import jax.numpy as jnp

    from swamla_jax.attention import attention
    from swamla_jax.kernels.documents import swa_document_attention
    from swamla_jax.model import document_positions

    rng = np.random.default_rng(window)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 90, h, 8)), jnp.float32) for h in (4, 2, 2))
    segs = jnp.asarray(segment_ids(np.where(rng.random((2, 90)) < 0.05, EOS, 0), EOS))
    pos = document_positions(segs)

    def fast(q, k, v):
        return swa_document_attention(q, k, v, segs, pos, scale=0.3, window=window, sink=sink)

    def ref(q, k, v):
        return attention(q, k, v, scale=0.3, window=window, sink=sink, documents=(segs, pos))

    assert_rel_close(jax.jit(fast)(q, k, v), jax.jit(ref)(q, k, v), 1e-6, "output")
    grads = [jax.jit(jax.grad(lambda *a, f=f: (f(*a) ** 2).sum(), (0, 1, 2)))(q, k, v)
             for f in (fast, ref)]
    for name, g, r in zip("qkv", *grads):
        assert_rel_close(g, r, 1e-5, f"d{name}")


def test_torch_flex_path_matches_reference():
    """FlexAttention with a per-batch document block mask equals the reference model."""
    cfg = tiny_config(n_layer=3)
    tm = perturbed_torch_model(cfg, 5)
    flex = st.SWAMLA(cfg, ComputePlan(attention_impl="flex")).eval()
    flex.load_state_dict(tm.state_dict())
    inputs, targets, segs = packed_rows(PACKINGS["short_and_long"], cfg.vocab_size, 5)
    ref_logits, _ = torch_run(tm)(inputs, targets, segs)
    logits, _ = torch_run(flex)(inputs, targets, segs)
    assert_rel_close(logits, ref_logits, LOGIT_RTOL, "logits")


# ------------------------------------------------------------------- fast kernels on the GPU
def _bf16_case(seed, B=2, T=2048, H=8, K=4, D=64, V=64, mean_length=300):
    """bf16 q, k, v at training shapes and the segment ids of random documents."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, h, d)).astype(np.float32)
               for h, d in ((H, D), (K, D), (K, V)))
    eos = rng.random((B, T)) < 1 / mean_length
    return q, k, v, segment_ids(np.where(eos, EOS, 0), EOS)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["swa", "mla"])
def test_jax_document_kernels_match_reference_in_bf16_on_gpu(kind):
    """The blocked SWA and the Pallas flash attention on bf16 inputs: output and gradients
    within bf16 rounding of the float32 reference."""
    import jax.numpy as jnp

    from swamla_jax.attention import attention
    from swamla_jax.kernels.documents import causal_document_attention, swa_document_attention
    from swamla_jax.model import document_positions

    if kind == "swa":
        q, k, v, segs = _bf16_case(0)
    else:  # MLA: one kv head per query head, qk 192 and v 128 wide
        q, k, v, segs = _bf16_case(1, H=8, K=8, D=192, V=128)
    segs = jnp.asarray(segs)
    pos = document_positions(segs)
    window = 256 if kind == "swa" else None

    def fast(q, k, v):
        if kind == "swa":
            return swa_document_attention(q, k, v, segs, pos, scale=0.1, window=window, sink=4)
        return causal_document_attention(q, k, v, segs, scale=0.1)

    def ref(q, k, v):
        return attention(q, k, v, scale=0.1, window=window, sink=4, documents=(segs, pos))

    args16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    args32 = [x.astype(jnp.float32) for x in args16]
    d_out = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape[:3] + v.shape[-1:]),
                        jnp.bfloat16)
    out16, vjp16 = jax.vjp(jax.jit(fast), *args16)
    out32, vjp32 = jax.vjp(jax.jit(ref), *args32)
    assert _rel(out16, out32) < 2e-2
    for g16, g32 in zip(vjp16(d_out), vjp32(d_out.astype(jnp.float32))):
        assert _rel(g16, g32) < 3e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [256, None])
def test_torch_document_flex_matches_reference_in_bf16_on_gpu(window):
    from swamla_torch.attention import attention
    from swamla_torch.kernels.attention import document_attention
    from swamla_torch.model import document_positions

    q, k, v, segs = _bf16_case(3) if window else _bf16_case(4, H=8, K=8, D=192, V=128)
    q, k, v = (torch.tensor(x, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for x in (q, k, v))
    segs = torch.tensor(segs, device="cuda")
    pos = document_positions(segs)
    out = document_attention(q, k, v, segs, pos, 0.1, window, 4)
    ref = attention(*(x.float() for x in (q, k, v)), scale=0.1, window=window, sink=4,
                    documents=(segs, pos))
    assert _rel(out.detach().float().cpu(), ref.detach().cpu()) < 2e-2  # numpy has no bf16
    d_out = torch.randn_like(out)
    g16 = torch.autograd.grad(out, (q, k, v), d_out)
    g32 = torch.autograd.grad(ref, (q, k, v), d_out.float())
    for a, b in zip(g16, g32):
        assert _rel(a.float().cpu(), b.float().cpu()) < 3e-2
