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
    inputs, targets, segs = packed_rows(PACKINGS["short_and_long"], cfg.vocab_size, 4)
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
