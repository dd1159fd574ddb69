"""The portable training state (swamla.train_state): round trips, validation errors, atomicity."""

import json

import numpy as np
import pytest

from swamla import train_state as ts
from swamla.config import load_preset
from swamla.layout import expected_shapes
from swamla.portable import CheckpointError


@pytest.fixture(scope="module")
def cfg():
    return load_preset("tiny", n_layer=3, vocab_size=128, block_size=32)


def make_state(cfg, optimizer_type="adamw", seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in expected_shapes(cfg).items()}
    moments = {f"{k}.{m}": rng.standard_normal(np.shape(v)).astype(np.float32)
               for k, v in params.items() for m in ts.moment_keys(optimizer_type)}
    meta = {"step": 7, "optimizer_type": optimizer_type, "train_config": {"max_iters": 10},
            "data_state": {"kind": "shards", "epoch": 0, "batch": 7}, "bad_steps": 1,
            "framework": "jax"}
    return params, moments, meta


@pytest.mark.parametrize("optimizer_type", ["adamw", "lion"])
def test_round_trip(tmp_path, cfg, optimizer_type):
    params, moments, meta = make_state(cfg, optimizer_type)
    out = ts.save_train_state(tmp_path / "state", cfg, params, moments, meta,
                              extra_files={"rng.pt": b"abc"})
    assert ts.is_train_state(out) and not ts.is_train_state(tmp_path)
    cfg2, params2, moments2, meta2 = ts.load_train_state(out)
    assert cfg2 == cfg
    assert params2.keys() == params.keys() and moments2.keys() == moments.keys()
    for k in params:
        np.testing.assert_array_equal(params2[k], params[k])
    for k in moments:
        np.testing.assert_array_equal(moments2[k], moments[k])
    assert meta2 == {"format": ts.FORMAT, "version": ts.VERSION, **meta}
    assert (out / "rng.pt").read_bytes() == b"abc"
    assert "step 7 (" + optimizer_type in ts.describe(out)
    assert [p.name for p in tmp_path.iterdir()] == ["state"]  # no temporary left behind


@pytest.mark.parametrize("mutate, message", [
    (lambda p, m, meta: m.pop("transformer.wte.weight.exp_avg_sq"),
     "missing moments transformer.wte.weight.exp_avg_sq"),
    (lambda p, m, meta: m.update({"transformer.wte.weight.exp_avg": np.zeros((3, 3))}),
     r"mis-shaped moments transformer.wte.weight.exp_avg: \(3, 3\) != parameter \(128, 64\)"),
    (lambda p, m, meta: m.update({"nope.exp_avg": np.zeros(3)}), "unexpected moments nope.exp_avg"),
    (lambda p, m, meta: meta.update(optimizer_type="lion"),
     r"unexpected moments .*exp_avg_sq.* \(exp_avg_sq belongs to adamw only\)"),
    (lambda p, m, meta: meta.update(optimizer_type="sgd"), "optimizer_type must be one of"),
    (lambda p, m, meta: meta.update(step=-1), "step must be an integer >= 0, got -1"),
    (lambda p, m, meta: meta.update(framework="tf"), "framework must be one of"),
    (lambda p, m, meta: meta.pop("bad_steps"), r"trainer state lacks \['bad_steps'\]"),
    (lambda p, m, meta: meta.update(bad_steps=8), r"bad_steps \(8\) counts skipped steps among "
     r"the step \(7\) done, so cannot exceed it"),
    (lambda p, m, meta: meta.update(extra=1), r"unknown trainer state keys \['extra'\]"),
    (lambda p, m, meta: p.pop("transformer.ln_f.weight"), "missing tensors transformer.ln_f"),
])
def test_save_rejects_bad_state(tmp_path, cfg, mutate, message):
    params, moments, meta = make_state(cfg)
    mutate(params, moments, meta)
    with pytest.raises(CheckpointError, match=message):
        ts.save_train_state(tmp_path / "state", cfg, params, moments, meta)
    assert not (tmp_path / "state").exists()
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path, cfg):
    with pytest.raises(ts.TrainStateError, match="does not exist"):
        ts.load_train_state(tmp_path / "missing")
    params, moments, meta = make_state(cfg)
    out = ts.save_train_state(tmp_path / "state", cfg, params, moments, meta)
    (out / ts.STATE_NAME).rename(tmp_path / "kept.json")
    with pytest.raises(ts.TrainStateError, match="no trainer_state.json: not a training state"):
        ts.load_train_state(out)
    state = json.loads((tmp_path / "kept.json").read_text())
    (out / ts.STATE_NAME).write_text(json.dumps({**state, "format": "other"}))
    with pytest.raises(ts.TrainStateError, match="format is 'other'"):
        ts.load_train_state(out)
    (out / ts.STATE_NAME).write_text(json.dumps({**state, "version": 2}))
    with pytest.raises(ts.TrainStateError, match="version 2 is not supported"):
        ts.load_train_state(out)
    (out / ts.STATE_NAME).write_text(json.dumps({**state, "optimizer_type": "lion"}))
    with pytest.raises(ts.TrainStateError, match="exp_avg_sq belongs to adamw only"):
        ts.load_train_state(out)
    (out / ts.STATE_NAME).write_text(json.dumps(state))
    (out / ts.OPTIMIZER_NAME).unlink()
    with pytest.raises(ts.TrainStateError, match="has no optimizer.safetensors"):
        ts.load_train_state(out)


def test_interrupted_save_keeps_previous_state(tmp_path, cfg, monkeypatch):
    params, moments, meta = make_state(cfg)
    out = ts.save_train_state(tmp_path / "state", cfg, params, moments, meta)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ts, "save_file", killed)
    params2, moments2, meta2 = make_state(cfg, seed=1)
    with pytest.raises(KeyboardInterrupt):
        ts.save_train_state(out, cfg, params2, moments2, {**meta2, "step": 8})
    _, loaded, _, loaded_meta = ts.load_train_state(out)
    assert loaded_meta["step"] == 7
    np.testing.assert_array_equal(loaded["transformer.wte.weight"],
                                  params["transformer.wte.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_cli_info_and_errors(tmp_path, cfg, capsys):
    params, moments, meta = make_state(cfg, "lion")
    ts.save_train_state(tmp_path / "state", cfg, params, moments, meta)
    assert ts.main(["info", str(tmp_path / "state")]) == 0
    assert "written by jax" in capsys.readouterr().out
    assert ts.main(["info", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
