"""ModelConfig: presets, validation messages that name the field, file loading, overrides."""

import json

import pytest

from swamla.config import PRESETS, BlockKind, ConfigError, ModelConfig, load_preset, resolve_config
from swamla.layout import count_params

# True counts of SPEC's shapes, tied embedding counted once (the original project's ~150M/~400M/... are wrong).
TRUE_COUNTS = {"small": 262_564_864, "base": 983_053_824, "large": 1_940_904_448,
               "xl": 8_578_671_616}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_parses(name):
    cfg = load_preset(name)
    assert cfg.vocab_size == 50304
    assert len(cfg.block_kinds) == cfg.n_layer
    if name != "tiny":
        assert cfg.block_size == 2048
        assert count_params(cfg) == TRUE_COUNTS[name]


def test_tiny_window_is_shorter_than_its_block():
    cfg = load_preset("tiny")
    assert cfg.swa_window < cfg.block_size


def test_medium_is_base():
    assert load_preset("medium") == load_preset("base")


def test_block_pattern():
    kinds = load_preset("small").block_kinds
    assert [k.value for k in kinds] == ["swa", "swa", "mla"] * 4
    cfg = load_preset("tiny", n_layer=7, swa_layers_per_cycle=1, mla_layers_per_cycle=2)
    assert cfg.block_kinds == (BlockKind.SWA, BlockKind.MLA, BlockKind.MLA) * 2 + (BlockKind.SWA,)
    assert cfg.n_cycles == 2
    only_swa = load_preset("tiny", mla_layers_per_cycle=0)
    assert set(only_swa.block_kinds) == {BlockKind.SWA}


def test_mlp_hidden_follows_overridden_width():
    cfg = load_preset("small").replace(n_embd=512, n_head=8)
    assert cfg.mlp_hidden == 2048 and cfg.mlp_hidden_dim is None
    assert load_preset("small", mlp_hidden_dim=1000).mlp_hidden == 1000


@pytest.mark.parametrize("overrides,message", [
    ({"n_embd": 100, "n_head": 16}, "n_embd (100) must be divisible by n_head (16)"),
    ({"ratio_kv": 3}, "n_head (16) must be divisible by ratio_kv (3)"),
    ({"n_embd": 48, "n_head": 16}, "SWA head dim n_embd / n_head = 3 must be even"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim (7) must be even"),
    ({"swa_window": 0}, "swa_window must be >= 1"),
    ({"kv_lora_rank": -4}, "kv_lora_rank must be >= 1"),
    ({"q_lora_rank": -1}, "q_lora_rank must be >= 0"),
    ({"swa_layers_per_cycle": 0, "mla_layers_per_cycle": 0}, "the block cycle is empty"),
    ({"mla_norm": "batchnorm"}, "mla_norm must be 'layernorm' or 'rmsnorm'"),
    ({"rope_scaling": {"type": "yarn", "factor": 2}}, "rope_scaling must be null or"),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, "rope_scaling.factor must be a positive"),
    ({"dropout": 1.0}, "dropout must be < 1.0"),
    ({"n_layer": 2.5}, "n_layer must be an integer"),
    ({"bias": "yes"}, "bias must be true or false"),
    ({"logit_scale_base": 0.5}, "logit_scale_base must be > 1.0"),
    ({"logit_scale_base": 2.0, "logit_scale_min": 3.0, "logit_scale_max": 2.0},
     "logit_scale_min (3.0) must be <= logit_scale_max (2.0)"),
    ({"norm_eps": 0}, "norm_eps must be > 0.0"),
])
def test_invalid_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_preset("small", **overrides)


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['n_layers'\]"):
        load_preset("small").replace(n_layers=3)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"n_layer": 2, "windw": 3}))
    with pytest.raises(ConfigError, match="windw"):
        ModelConfig.load(path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_preset("huge")


def test_json_round_trip(tmp_path):
    cfg = load_preset("tiny", rope_scaling={"type": "linear", "factor": 2.0}, q_lora_rank=8)
    cfg.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["architecture"] == "SWAMLA" and data["format_version"] == 1
    assert ModelConfig.load(tmp_path) == cfg
    assert hash(ModelConfig.load(tmp_path)) == hash(cfg)


def test_wrong_architecture_or_version(tmp_path):
    with pytest.raises(ConfigError, match="architecture is 'Llama'"):
        ModelConfig.from_dict({"architecture": "Llama"})
    with pytest.raises(ConfigError, match="format_version 99 is not supported"):
        ModelConfig.from_dict({"format_version": 99})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        ModelConfig.load(tmp_path / "bad.json")


def test_resolve_config_sources(tmp_path):
    tiny = load_preset("tiny")
    tiny.save(tmp_path / "t.json")
    assert resolve_config("tiny") == tiny
    assert resolve_config(tmp_path / "t.json") == tiny
    assert resolve_config(tiny.to_dict(), n_layer=2).n_layer == 2


@pytest.mark.parametrize("name", ["small", "base"])
def test_count_params_matches_the_models(name):
    """The formula agrees with both backends' real parameter counts (no weights allocated)."""
    torch = pytest.importorskip("torch")
    import swamla_jax as sj
    import swamla_torch as st

    cfg = load_preset(name)
    with torch.device("meta"):
        assert st.SWAMLA(cfg).num_params() == count_params(cfg)
    shapes = sj.abstract_params(sj.SWAMLA(cfg))
    import jax
    import math
    assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == count_params(cfg)
