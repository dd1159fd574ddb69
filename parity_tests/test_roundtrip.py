"""Conversions are bit-exact: torch -> portable -> jax -> portable -> torch, and the CLI."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load_safetensors

import swamla_jax as sj
import swamla_torch as st
from parity_helpers import VARIANTS, perturbed_torch_model, tiny_config
from swamla.convert_cli import main as convert_main
from swamla.portable import INDEX_NAME, load_portable

pytestmark = pytest.mark.parity


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_exact(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("variant", ["default", "q_lora", "dyt", "bias", "gqa", "cycle_1_2"])
def test_torch_jax_torch_is_bit_exact(tmp_path, variant):
    cfg = tiny_config(**VARIANTS[variant])
    tm = perturbed_torch_model(cfg, seed=0)
    st.save_pretrained(tm, tmp_path / "a")
    jm = sj.load_pretrained(tmp_path / "a")
    sj.save_pretrained(jm, tmp_path / "b")
    back = st.load_pretrained(tmp_path / "b")
    assert back.config == cfg
    assert_bit_exact(state(tm), state(back))
    # The portable files themselves hold identical tensors and configs.
    ca, ta = load_portable(tmp_path / "a")
    cb, tb = load_portable(tmp_path / "b")
    assert ca == cb and set(ta) == set(tb)
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert json.loads((tmp_path / "a/config.json").read_text())["architecture"] == "SWAMLA"


def test_jax_torch_jax_is_bit_exact(tmp_path):
    jm = sj.from_config(tiny_config(), seed=3)
    sj.save_pretrained(jm, tmp_path / "a")
    sj.save_pretrained(sj.load_pretrained(tmp_path / "a"), tmp_path / "b")
    st.save_pretrained(st.load_pretrained(tmp_path / "b"), tmp_path / "c")
    again = sj.load_pretrained(tmp_path / "c")
    a = sj.to_portable_tensors(jm.config, jm.params)
    b = sj.to_portable_tensors(again.config, again.params)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_roundtrip(tmp_path):
    tm = perturbed_torch_model(tiny_config(), seed=1)
    st.save_pretrained(tm, tmp_path / "ckpt", max_shard_bytes=2**20)
    index = json.loads((tmp_path / "ckpt" / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    assert_bit_exact(state(tm), state(st.load_pretrained(tmp_path / "ckpt")))
    jm = sj.load_pretrained(tmp_path / "ckpt")
    assert all(np.array_equal(v, tm.state_dict()[k].numpy())
               for k, v in sj.to_portable_tensors(jm.config, jm.params).items())


def test_bfloat16_checkpoint(tmp_path):
    tm = perturbed_torch_model(tiny_config(), seed=2)
    st.save_pretrained(tm, tmp_path / "bf16", dtype="bfloat16")
    raw = torch_load_safetensors(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in raw.values())
    assert set(raw) == set(tm.state_dict())  # readable by the stock safetensors loader
    loaded = st.load_pretrained(tmp_path / "bf16")
    for k, v in tm.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16).float()), k


def test_tied_embedding_stored_once(tmp_path):
    st.save_pretrained(st.from_config(tiny_config()), tmp_path / "c")
    names = set(torch_load_safetensors(str(tmp_path / "c" / "model.safetensors")))
    assert "transformer.wte.weight" in names and not any("lm_head" in n for n in names)


def test_converter_cli_round_trip(tmp_path, capsys):
    tm = perturbed_torch_model(tiny_config(q_lora_rank=24), seed=4)
    st.save_native(tm, tmp_path / "model.pt")
    assert convert_main([str(tmp_path / "model.pt"), str(tmp_path / "jax"), "--to", "jax"]) == 0
    assert convert_main([str(tmp_path / "jax"), str(tmp_path / "portable"), "--to", "portable"]) == 0
    assert convert_main([str(tmp_path / "portable"), str(tmp_path / "back.pt"), "--to", "torch"]) == 0
    assert_bit_exact(state(tm), state(st.load_native(tmp_path / "back.pt")))
    assert "wrote torch checkpoint" in capsys.readouterr().out


def test_converter_cli_rejects_unknown_source(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert convert_main([str(tmp_path / "junk"), str(tmp_path / "out"), "--to", "jax"]) == 2
    assert "is not an SWA-MLA checkpoint" in capsys.readouterr().err
