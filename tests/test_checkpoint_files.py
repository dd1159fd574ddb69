"""Checkpoint files on disk: what a save may replace, damaged files, permissions, a full disk, and
the debris of a killed save. Each error a user can hit is asserted by message."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

import swamla.portable as portable
import swamla_torch as st
from swamla import train_state as ts
from swamla.config import ConfigError, load_preset
from swamla.convert_cli import main as convert_main
from swamla.layout import expected_shapes
from swamla.portable import (CheckpointError, CheckpointWriteError, load_portable,
                             remove_stale_temporaries, save_portable)
from swamla_torch.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def cfg():
    return load_preset("tiny", n_layer=3, vocab_size=128, block_size=32)


def weights(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in expected_shapes(cfg).items()}


def save_state(cfg, directory, step=7, seed=0):
    params = weights(cfg, seed)
    moments = {f"{k}.exp_avg": np.full_like(v, 0.5) for k, v in params.items()}
    meta = {"step": step, "optimizer_type": "lion", "train_config": {}, "data_state": None,
            "bad_steps": 0, "framework": "torch"}
    return ts.save_train_state(directory, cfg, params, moments, meta)


@pytest.fixture()
def ckpt(tmp_path, cfg):
    return save_portable(weights(cfg), cfg, tmp_path / "ckpt")


@pytest.fixture()
def run_dir(tmp_path, cfg):
    """A training run's output_dir: what a careless destination would destroy."""
    run = tmp_path / "run"
    save_state(cfg, run / "checkpoints" / "step_00000008")
    (run / "metrics.jsonl").write_text('{"step": 8, "loss": 3.0}\n')
    (run / "train_config.json").write_text("{}")
    return run


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def run_cli(main, argv, capsys):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------ what a save may replace
@pytest.mark.parametrize("to, dst", [("portable", "run"), ("jax", "run"), ("portable", "notes"),
                                     ("jax", "notes")])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_convert_never_replaces_another_kind_of_directory(tmp_path, ckpt, run_dir, capsys, to,
                                                          dst, overwrite):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    before = {d: tree(tmp_path / d) for d in ("run", "notes")}
    rc, err = run_cli(convert_main, [ckpt, tmp_path / dst, "--to", to, *overwrite], capsys)
    assert rc == 2
    assert f"refusing to write a {'portable' if to == 'portable' else 'native JAX'} checkpoint" \
           f" at {tmp_path / dst}: it exists, is not empty" in err
    assert {d: tree(tmp_path / d) for d in ("run", "notes")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes", "run"]


def test_convert_replaces_a_checkpoint_of_its_kind_only_with_overwrite(tmp_path, cfg, ckpt,
                                                                       capsys):
    other = save_portable(weights(cfg, seed=1), cfg, tmp_path / "other")
    rc, err = run_cli(convert_main, [ckpt, other, "--to", "portable"], capsys)
    assert rc == 2 and "already holds a portable checkpoint; pass --overwrite" in err
    assert np.array_equal(load_portable(other)[1]["transformer.wte.weight"],
                          weights(cfg, seed=1)["transformer.wte.weight"])
    assert convert_main([str(ckpt), str(other), "--to", "portable", "--overwrite"]) == 0
    assert np.array_equal(load_portable(other)[1]["transformer.wte.weight"],
                          weights(cfg)["transformer.wte.weight"])
    (tmp_path / "empty").mkdir()  # an empty directory needs no --overwrite
    assert convert_main([str(ckpt), str(tmp_path / "empty"), "--to", "portable"]) == 0
    # a training state holds more than weights: a portable save never replaces one
    state = save_state(cfg, tmp_path / "state")
    rc, err = run_cli(convert_main, [ckpt, state, "--to", "portable", "--overwrite"], capsys)
    assert rc == 2 and "is not a portable checkpoint" in err and ts.is_train_state(state)


def test_jax_convert_into_a_jax_checkpoint(tmp_path, ckpt, capsys):
    """--to jax used to merge into whatever was there; now it replaces a native JAX checkpoint
    (with --overwrite) atomically, and leaves nothing beside it."""
    assert convert_main([str(ckpt), str(tmp_path / "j"), "--to", "jax"]) == 0
    (tmp_path / "j" / "stray.txt").write_text("left by hand")
    rc, err = run_cli(convert_main, [ckpt, tmp_path / "j", "--to", "jax"], capsys)
    assert rc == 2 and "pass --overwrite" in err
    assert convert_main([str(ckpt), str(tmp_path / "j"), "--to", "jax", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["config.json", "params"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "j"]


def test_library_saves_refuse_another_kind(tmp_path, cfg, run_dir):
    before = tree(run_dir)
    with pytest.raises(CheckpointError, match="is not a portable checkpoint"):
        save_portable(weights(cfg), cfg, run_dir)
    with pytest.raises(CheckpointError, match="is not a training state"):
        save_state(cfg, run_dir)
    assert tree(run_dir) == before
    # a trainer re-writing its own step directory still works
    step = run_dir / "checkpoints" / "step_00000008"
    save_state(cfg, step, step=9, seed=3)
    assert ts.load_train_state(step)[3]["step"] == 9
    assert sorted(p.name for p in step.parent.iterdir()) == ["step_00000008"]


def test_export_refuses_a_run_directory(tmp_path, cfg, run_dir, capsys):
    state = save_state(cfg, tmp_path / "state")
    before = tree(run_dir)
    for extra in ([], ["--overwrite"]):
        rc, err = run_cli(ts.main, ["export-torch", state, run_dir, *extra], capsys)
        assert rc == 2 and "refusing to write a training state" in err
    assert tree(run_dir) == before
    again = save_state(cfg, tmp_path / "again", step=3)
    rc, err = run_cli(ts.main, ["export-torch", state, again], capsys)
    assert rc == 2 and "already holds a training state; pass --overwrite" in err
    assert ts.main(["export-torch", str(state), str(again), "--overwrite"]) == 0
    assert ts.load_train_state(again)[3]["step"] == 7


def test_export_jax_bad_sources_exit_2(tmp_path, capsys):
    from swamla.train_config import parse_args

    rc, err = run_cli(ts.main, ["export-jax", tmp_path / "nonexist", tmp_path / "out"], capsys)
    assert rc == 2 and err.startswith("error: ") and "is not a JAX run directory" in err
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    parse_args(["--size", "tiny", "--output_dir", str(run)]).save(run / "train_config.json")
    rc, err = run_cli(ts.main, ["export-jax", run, tmp_path / "out"], capsys)
    assert rc == 2 and err.startswith("error: ") and "holds no checkpoint" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ --to torch destinations
def test_convert_to_torch_needs_a_pt_file_name(tmp_path, ckpt, capsys):
    (tmp_path / "existing_dir").mkdir()
    (tmp_path / "existing_dir" / "keep.txt").write_text("mine")
    for dst, message in [("out_int32", "out_int32 is not named *.pt or *.pth: give a file name "
                                       "such as out_int32.pt"),
                         ("existing_dir", "existing_dir is a directory")]:
        rc, err = run_cli(convert_main, [ckpt, tmp_path / dst, "--to", "torch"], capsys)
        assert rc == 2 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "existing_dir"]  # no debris
    assert convert_main([str(ckpt), str(tmp_path / "out.pt"), "--to", "torch"]) == 0
    assert convert_main([str(tmp_path / "out.pt"), str(tmp_path / "back"), "--to", "portable"]) == 0
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    rc, err = run_cli(convert_main, [ckpt, tmp_path / "notes.pt", "--to", "torch", "--overwrite"],
                      capsys)
    assert rc == 2 and "is not a native PyTorch checkpoint" in err
    assert (tmp_path / "notes.pt").read_text() == "not a checkpoint"
    assert convert_main([str(ckpt), str(tmp_path / "out.pt"), "--to", "torch", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "ckpt", "existing_dir",
                                                          "notes.pt", "out.pt"]


# ------------------------------------------------------------------ damaged files
def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_truncated_weights(tmp_path, cfg, ckpt, capsys, monkeypatch):
    from swamla_torch import generate as tg

    truncate(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt .*"
                                              r"re-export or re-convert"):
        st.load_pretrained(ckpt)
    rc, err = run_cli(convert_main, [ckpt, tmp_path / "x.pt", "--to", "torch"], capsys)
    assert rc == 2 and f"{ckpt / 'model.safetensors'} is truncated or corrupt" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the bundled GPT-2 BPE, no network probe
    rc, err = run_cli(tg.main, [ckpt, "--prompt", "hi", "--device", "cpu"], capsys)
    assert rc == 2 and err.startswith("error: ") and "truncated or corrupt" in err


def test_truncated_optimizer_state(tmp_path, cfg):
    state = save_state(cfg, tmp_path / "state")
    truncate(state / ts.OPTIMIZER_NAME)
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors is truncated or corrupt "
                                              r".*resume from an earlier checkpoint"):
        ts.load_train_state(state)


def test_corrupt_rng_state(tmp_path, cfg):
    state = save_state(cfg, tmp_path / "state")
    buf = tmp_path / "rng.pt"
    torch.save([{"cpu": torch.get_rng_state()}], buf)
    (state / "rng.pt").write_bytes(buf.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"rng.pt is truncated or corrupt .*earlier "
                                              r"checkpoint, or delete it"):
        load_checkpoint(state)


@pytest.mark.parametrize("index, message", [
    ({"metadata": {}}, "has no valid weight_map"),
    ({"weight_map": {"transformer.wte.weight": "../elsewhere.safetensors"}},
     "has no valid weight_map"),
    ("{not json", "is not valid JSON"),
])
def test_bad_shard_index(tmp_path, cfg, index, message):
    ckpt = save_portable(weights(cfg), cfg, tmp_path / "ckpt", max_shard_bytes=2**16)
    (ckpt / "model.safetensors.index.json").write_text(
        index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json {message}"):
        load_portable(ckpt)


@pytest.mark.parametrize("dtype", [np.int32, np.float16])
def test_dtype_outside_spec(ckpt, dtype):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["transformer.h.1.attn.q_proj.weight"] = \
        tensors["transformer.h.1.attn.q_proj.weight"].astype(dtype)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"must be float32 or bfloat16 \(SPEC section 7\), "
                       rf"got transformer.h.1.attn.q_proj.weight \({np.dtype(dtype)}\)"):
        load_portable(ckpt)


def test_bfloat16_is_within_spec(tmp_path, cfg):
    _, tensors = load_portable(save_portable(weights(cfg), cfg, tmp_path / "bf16",
                                             dtype="bfloat16"))
    assert {v.dtype for v in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}


# ------------------------------------------------------------------ config.json fields
def edit_config(directory, edit):
    data = json.loads((directory / "config.json").read_text())
    edit(data)
    (directory / "config.json").write_text(json.dumps(data))


def test_config_missing_a_field(tmp_path, ckpt):
    edit_config(ckpt, lambda d: (d.pop("swa_window"), d.pop("rope_theta")))
    with pytest.raises(CheckpointError, match=r"lacks field\(s\) \['rope_theta', 'swa_window'\]"):
        load_portable(ckpt)
    edit_config(ckpt, lambda d: (d.update(swa_window=32, rope_theta=10000.0),
                                 d.pop("format_version")))
    with pytest.raises(CheckpointError, match=r"lacks \['format_version'\]"):
        load_portable(ckpt)


def test_native_configs_missing_a_field(tmp_path, ckpt):
    import swamla_jax as sj

    assert convert_main([str(ckpt), str(tmp_path / "j"), "--to", "jax"]) == 0
    edit_config(tmp_path / "j", lambda d: d.pop("swa_window"))
    with pytest.raises(ConfigError, match=r"lacks field\(s\) \['swa_window'\]"):
        sj.load_native(tmp_path / "j")
    assert convert_main([str(ckpt), str(tmp_path / "m.pt"), "--to", "torch"]) == 0
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    del blob["config"]["mla_norm"]
    torch.save(blob, tmp_path / "m.pt")
    with pytest.raises(ConfigError, match=r"lacks field\(s\) \['mla_norm'\]"):
        st.load_native(tmp_path / "m.pt")


# ------------------------------------------------------------------ permissions
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_permissions_follow_the_umask(tmp_path, cfg, ckpt, umask):
    old = os.umask(umask)
    try:
        outputs = [save_portable(weights(cfg), cfg, tmp_path / "portable"),
                   save_state(cfg, tmp_path / "state")]
        assert convert_main([str(ckpt), str(tmp_path / "m.pt"), "--to", "torch"]) == 0
        assert convert_main([str(ckpt), str(tmp_path / "j"), "--to", "jax"]) == 0
    finally:
        os.umask(old)
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "m.pt").stat().st_mode) == file_mode
    for root in [*outputs, tmp_path / "j"]:
        assert stat.S_IMODE(root.stat().st_mode) == dir_mode
        for path in root.rglob("*"):
            want = dir_mode if path.is_dir() else file_mode
            assert stat.S_IMODE(path.stat().st_mode) == want, path


# ------------------------------------------------------------------ a full disk
def full_disk(*args, **kwargs):  # what safetensors raises when a write hits ENOSPC
    raise SafetensorError("Error while serializing: I/O error: No space left on device "
                          "(os error 28)")


def test_full_disk_names_the_directory_and_keeps_the_previous(tmp_path, cfg, ckpt, capsys,
                                                              monkeypatch):
    state = save_state(cfg, tmp_path / "step_00000008")
    monkeypatch.setattr(portable, "save_file", full_disk)
    for save, target in [(lambda: save_portable(weights(cfg, 1), cfg, ckpt), ckpt),
                         (lambda: save_state(cfg, state, step=9, seed=1), state)]:
        with pytest.raises(CheckpointWriteError, match=rf"could not write {target}: .*No space "
                           r"left on device.* the checkpoints beside it are intact"):
            save()
    assert np.array_equal(load_portable(ckpt)[1]["transformer.wte.weight"],
                          weights(cfg)["transformer.wte.weight"])
    assert ts.load_train_state(state)[3]["step"] == 7
    rc, err = run_cli(convert_main, [ckpt, tmp_path / "out", "--to", "portable"], capsys)
    assert rc == 1 and "error: could not write" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "step_00000008"]


def test_full_disk_while_writing_moments(tmp_path, cfg, monkeypatch):
    monkeypatch.setattr(ts, "save_file", full_disk)
    with pytest.raises(OSError, match="could not write .*state: .*No space left"):
        save_state(cfg, tmp_path / "state")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ debris of a killed save
def test_killed_save_leaves_a_temporary_that_is_then_removed(tmp_path, cfg):
    """SIGKILL in the middle of a save (after the first file): the previous checkpoint stands,
    and remove_stale_temporaries clears the partial copy and nothing else."""
    ckpts = tmp_path / "checkpoints"
    save_state(cfg, ckpts / "step_00000004")
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from swamla import train_state as ts
        from swamla.config import load_preset
        from swamla.layout import expected_shapes

        cfg = load_preset("tiny", n_layer=3, vocab_size=128, block_size=32)
        params = {{k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg).items()}}
        moments = {{f"{{k}}.exp_avg": v for k, v in params.items()}}
        meta = {{"step": 8, "optimizer_type": "lion", "train_config": {{}}, "data_state": None,
                "bad_steps": 0, "framework": "torch"}}
        ts.save_file = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        ts.save_train_state({str(ckpts / "step_00000008")!r}, cfg, params, moments, meta)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = [p for p in ckpts.iterdir() if p.name.startswith(".step_00000008.tmp-")]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()
    keep = [ckpts / "notes.tmp-1", ckpts / ".hidden", ckpts / ".config.json.tmp-x"]
    keep[0].mkdir()
    keep[1].mkdir()
    keep[2].write_text("a file, not a save's directory")
    assert remove_stale_temporaries(ckpts) == left
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(
        [".config.json.tmp-x", ".hidden", "notes.tmp-1", "step_00000004"])
    assert ts.load_train_state(ckpts / "step_00000004")[3]["step"] == 7


def test_remove_stale_temporaries_restores_a_swapped_out_checkpoint(tmp_path, cfg):
    """A kill between the two renames of a swap leaves the previous checkpoint as .NAME.old-*;
    it is put back, while an .old-* whose NAME exists (killed before deleting it) goes."""
    a = save_portable(weights(cfg), cfg, tmp_path / "a")
    b = save_portable(weights(cfg), cfg, tmp_path / "b")
    os.rename(a, tmp_path / ".a.old-1a2b3c4d")
    (tmp_path / ".a.tmp-5e6f7a8b").mkdir()  # the complete new one, not yet swapped in
    save_portable(weights(cfg), cfg, tmp_path / ".b.old-0f0f0f0f")
    old_style = tmp_path / ".b.tmp-k3_9x2qz"  # tempfile.mkdtemp's suffix, of earlier versions
    old_style.mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".a.tmp-5e6f7a8b", ".b.old-0f0f0f0f",
                                               ".b.tmp-k3_9x2qz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    load_portable(a), load_portable(b)
    assert remove_stale_temporaries(tmp_path / "missing") == []
