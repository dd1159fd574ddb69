"""Targets outside the vocabulary get the same clear error as such inputs, in both backends
(torch's loss would fail with a bare index error, JAX's would be NaN or silently wrong)."""

import numpy as np
import pytest
import torch

import swamla_jax as sj
import swamla_torch as st
from swamla.config import load_preset
from swamla.plan import ComputePlan

V = 256
MESSAGE = r"targets must lie in \[0, 256\) \(vocab_size\) or be -100"


@pytest.fixture(scope="module")
def cfg():
    return load_preset("tiny", n_layer=2, block_size=16, vocab_size=V)


def _batch(bad=None):
    idx = np.arange(8, dtype=np.int32)[None] % V
    targets = np.full((1, 8), 3, np.int32)
    targets[0, 5] = -100  # no loss here: always allowed
    if bad is not None:
        targets[0, 2] = bad
    return idx, targets


@pytest.fixture(scope="module")
def torch_models(cfg):
    """The model by loss chunk (0: whole rows)."""
    return {chunk: st.from_config(cfg, seed=0, plan=ComputePlan(loss_chunk=chunk))
            for chunk in (0, 4)}


@pytest.fixture(scope="module")
def jax_model(cfg):
    return sj.from_config(cfg)


@pytest.mark.parametrize("loss_chunk", [0, 4])
@pytest.mark.parametrize("bad", [V, V + 1000, -1, -5])
def test_torch_targets_outside_vocab(torch_models, bad, loss_chunk):
    idx, targets = _batch(bad)
    torch_model = torch_models[loss_chunk]
    with pytest.raises(ValueError, match=MESSAGE + f".*got min {min(bad, 3)} max {max(bad, 3)}"):
        torch_model(torch.from_numpy(idx).long(), torch.from_numpy(targets).long())


@pytest.mark.parametrize("loss_chunk", [0, 4])
def test_torch_good_targets_pass_and_the_trainer_switch_skips_the_check(torch_models, loss_chunk):
    torch_model = torch_models[loss_chunk]
    idx, targets = (torch.from_numpy(a).long() for a in _batch())
    _, loss = torch_model(idx, targets)
    assert torch.isfinite(loss)
    torch_model.check_inputs = False  # the trainer checks on the host: no device sync here
    try:
        with pytest.raises((RuntimeError, IndexError)):  # torch's own error, not ours
            torch_model(idx, torch.from_numpy(_batch(V)[1]).long())
    finally:
        torch_model.check_inputs = True


@pytest.mark.parametrize("loss_chunk", [0, 4])
@pytest.mark.parametrize("bad", [V, V + 1000, -1, -5])
def test_jax_targets_outside_vocab(cfg, jax_model, bad, loss_chunk):
    idx, targets = _batch(bad)
    module = sj.SWAMLA(cfg, ComputePlan(loss_chunk=loss_chunk))
    with pytest.raises(ValueError, match=MESSAGE + f".*got min {min(bad, 3)} max {max(bad, 3)}"):
        module.apply({"params": jax_model.params}, idx, targets)
    with pytest.raises(ValueError, match=MESSAGE):  # the public call, which jits the module
        jax_model(idx, targets)


def test_jax_good_targets_pass(cfg, jax_model):
    idx, targets = _batch()
    _, loss = sj.SWAMLA(cfg).apply({"params": jax_model.params}, idx, targets)
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("idx_shape, targets_shape, message", [
    ((8,), None, r"token ids must be a \(batch, time\) array, got shape \(8,\)"),
    ((1, 0), None, r"token ids of shape \(1, 0\) are empty"),
    ((0, 8), None, r"token ids of shape \(0, 8\) are empty"),
    ((1, 8), (1, 6), r"targets of shape \(1, 6\) do not match the token ids' \(1, 8\)"),
    ((2, 8), (1, 8), r"targets of shape \(1, 8\) do not match the token ids' \(2, 8\)"),
    ((1, 17), None, r"sequence length 17 exceeds block_size 16"),
])
def test_input_shapes_are_checked_alike(cfg, jax_model, torch_models, backend, idx_shape,
                                        targets_shape, message):
    """Both backends name a bad shape instead of failing inside (a reshape, a broadcast, a
    modulo by zero) or, in PyTorch, broadcasting targets shorter than the inputs."""
    idx = np.zeros(idx_shape, np.int32)
    targets = None if targets_shape is None else np.zeros(targets_shape, np.int32)
    with pytest.raises(ValueError, match=message):
        if backend == "jax":
            jax_model(idx, targets)
        else:
            torch_models[0](torch.from_numpy(idx).long(),
                            None if targets is None else torch.from_numpy(targets).long())
