"""Each error a user can hit with bad model input or a bad checkpoint, asserted by message."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import swamla_jax as sj
import swamla_torch as st
from swamla.config import load_preset
from swamla.portable import CheckpointError


@pytest.fixture(scope="module")
def cfg():
    return load_preset("tiny", n_layer=3, block_size=64)


@pytest.fixture()
def ckpt(tmp_path, cfg):
    st.save_pretrained(st.from_config(cfg), tmp_path / "ckpt")
    return tmp_path / "ckpt"


LOADERS = [pytest.param(st.load_pretrained, id="torch"), pytest.param(sj.load_pretrained, id="jax")]


def test_sequence_longer_than_block_size(cfg):
    idx = np.zeros((1, 65), np.int32)
    with pytest.raises(ValueError, match="sequence length 65 exceeds block_size 64"):
        sj.from_config(cfg)(idx)
    with pytest.raises(ValueError, match="sequence length 65 exceeds block_size 64"):
        st.from_config(cfg)(torch.from_numpy(idx).long())


@pytest.mark.parametrize("bad", [-1, 50304, 60000])
def test_token_ids_outside_vocab(cfg, bad):
    idx = np.zeros((1, 8), np.int32)
    idx[0, 3] = bad
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50304\)"):
        sj.from_config(cfg)(idx)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50304\)"):
        st.from_config(cfg)(torch.from_numpy(idx).long())


@pytest.mark.parametrize("load", LOADERS)
def test_missing_tensor(ckpt, load):
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["transformer.h.1.attn.k_proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors transformer.h.1.attn.k_proj.weight"):
        load(ckpt)


@pytest.mark.parametrize("load", LOADERS)
def test_extra_tensor(ckpt, load):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors lm_head.weight"):
        load(ckpt)


@pytest.mark.parametrize("load", LOADERS)
def test_misshaped_tensor(ckpt, load):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["transformer.h.2.attn.wkv_b.weight"] = np.zeros((5, 5), np.float32)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors transformer.h.2.attn.wkv_b"):
        load(ckpt)


@pytest.mark.parametrize("load", LOADERS)
def test_config_that_does_not_match_weights(ckpt, load):
    data = json.loads((ckpt / "config.json").read_text())
    data["kv_lora_rank"] = 48
    (ckpt / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        load(ckpt)


@pytest.mark.parametrize("load", LOADERS)
def test_override_that_changes_the_weights_shapes(ckpt, load):
    """The caller's override is at fault, not the checkpoint; a shape-free one is fine."""
    with pytest.raises(CheckpointError, match=r"override n_embd=128 \(checkpoint: \d+\) changes "
                       r"the shapes of the weights"):
        load(ckpt, n_embd=128)
    assert load(ckpt, block_size=128, dropout=0.1).config.block_size == 128


@pytest.mark.parametrize("load", LOADERS)
def test_not_a_checkpoint(tmp_path, load):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load(tmp_path / "empty")


def test_invalid_config_in_checkpoint(ckpt):
    data = json.loads((ckpt / "config.json").read_text())
    data["n_head"] = 5
    (ckpt / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"n_embd \(64\) must be divisible by n_head \(5\)"):
        st.load_pretrained(ckpt)


def test_failed_save_keeps_previous_checkpoint(ckpt, cfg, monkeypatch):
    """A crash mid-save (here: the disk 'fills' while writing) leaves the old checkpoint intact."""
    before = load_file(str(ckpt / "model.safetensors"))
    import swamla.portable as portable

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(portable, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        st.save_pretrained(st.from_config(cfg, seed=5), ckpt)
    after = load_file(str(ckpt / "model.safetensors"))
    assert set(after) == set(before) and all(np.array_equal(after[k], before[k]) for k in before)
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]  # no temporary left behind


def test_jax_dropout_is_random_in_training_only():
    """Dropout (embedding, attention probabilities, residual) acts only with train=True, and is
    a function of the rng."""
    import jax

    cfg = load_preset("tiny", n_layer=3, dropout=0.2)
    model = sj.from_config(cfg)
    idx = np.random.default_rng(0).integers(0, 1000, (2, 40))
    eval_a, eval_b = model(idx)[0], model(idx)[0]
    np.testing.assert_array_equal(eval_a, eval_b)
    a = model(idx, train=True, rng=jax.random.key(1))[0]
    b = model(idx, train=True, rng=jax.random.key(1))[0]
    c = model(idx, train=True, rng=jax.random.key(2))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, eval_a)
    with pytest.raises(ValueError, match="needs rng"):
        model(idx, train=True)
