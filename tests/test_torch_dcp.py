"""Sharded PyTorch checkpoints (torch.distributed.checkpoint): resume at another world size or
wrapping with the losses of an uninterrupted run, a rank's host memory during a save, a kill -9
or a full disk during an asynchronous save, and the portable training state and old checkpoints
beside them. Multi-process runs use gloo on CPU through ``torchrun`` (tests/dcp_ranks.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from swamla import train_state as ts
from swamla_torch import train as train_mod
from swamla_torch.checkpoint import (is_sharded_checkpoint, list_checkpoints, load_checkpoint,
                                     sharded_reader)
from swamla_torch.train import TrainingError, export_train_state, train
import test_torch_train
from test_torch_train import exported, losses, make_cfg

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quiet_cpu(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """test_torch_train's token shards (its fixture's function, run for this module)."""
    return test_torch_train.shards.__wrapped__(tmp_path_factory)


def step_dir(out, step):
    return Path(out) / "checkpoints" / f"step_{step:08d}"


def torchrun(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           # every allocation over 64 KiB is its own mapping, returned when freed: the resident
           # size then follows what is allocated (glibc's default would keep freed memory)
           "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "dcp_ranks.py"), *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def assert_losses_continue(resumed, straight, steps):
    got, want = losses(resumed), losses(straight)
    assert sorted(got) == list(steps)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=0,
                               atol=1e-6)


@pytest.mark.slow
def test_resume_at_another_world_size(shards, tmp_path):
    """One process (batch 4) for 4 steps is the uninterrupted run. Its step-2 checkpoint resumes
    under FSDP2 on 2 ranks (1 -> 2) and under DDP; the FSDP2 ranks' step-3 checkpoint resumes in
    one process (2 -> 1) and the DDP ranks' one under FSDP2 (DDP -> FSDP2): every loss is the
    uninterrupted run's."""
    one = make_cfg(shards, tmp_path / "one", batch_size=4, gradient_accumulation_steps=2,
                   max_iters=4, save_interval=2, eval_interval=100, keep_checkpoints=0)
    train(one)
    assert is_sharded_checkpoint(step_dir(tmp_path / "one", 2))
    two = one.replace(batch_size=2, save_interval=1, resume=str(step_dir(tmp_path / "one", 2)))
    runs = {"fsdp": two.replace(fsdp=True, output_dir=str(tmp_path / "fsdp")),
            "ddp": two.replace(output_dir=str(tmp_path / "ddp"), max_iters=4),
            "ddp_to_fsdp": two.replace(fsdp=True, output_dir=str(tmp_path / "ddp_to_fsdp"),
                                       resume=str(step_dir(tmp_path / "ddp", 3)))}
    for name, cfg in runs.items():
        cfg.save(tmp_path / f"{name}.json")
    log = torchrun("train", *(tmp_path / f"{name}.json" for name in runs))
    assert "(FSDP2)" in log and "(DDP)" in log
    marker = json.loads((step_dir(tmp_path / "fsdp", 3) / "checkpoint.json").read_text())
    assert marker["world_size"] == 2
    assert sorted(p.name for p in step_dir(tmp_path / "fsdp", 3).glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards
    train(one.replace(output_dir=str(tmp_path / "back"), resume=str(step_dir(tmp_path / "fsdp",
                                                                              3))))
    assert_losses_continue(tmp_path / "fsdp", tmp_path / "one", [3, 4])
    assert_losses_continue(tmp_path / "ddp", tmp_path / "one", [3, 4])
    assert_losses_continue(tmp_path / "ddp_to_fsdp", tmp_path / "one", [4])
    assert_losses_continue(tmp_path / "back", tmp_path / "one", [4])
    for run in runs:
        np.testing.assert_allclose(exported(tmp_path / run)["transformer.wte.weight"],
                                   exported(tmp_path / "one")["transformer.wte.weight"], atol=1e-6)


@pytest.mark.slow
def test_a_ranks_host_memory_during_a_save_is_its_shard(tmp_path):
    """FSDP2 on 2 ranks, a 20M-parameter model (full state: weights and two moments, 242 MB):
    the peak host allocation of a rank during a sharded save stays within its shard plus one
    tensor, while gathering the full state (what every rank did before) takes it all."""
    torchrun("memory", tmp_path / "memory.json")
    for rank in (0, 1):
        m = json.loads((tmp_path / f"memory.{rank}.json").read_text())
        slack = 16 * 2**20  # the writer's buffers, DCP's plans, the interpreter
        assert m["shard"] <= 0.51 * m["full"]
        assert m["save"] <= m["shard"] + m["largest"] + slack, m
        assert m["save"] < 0.7 * m["full"], m
        assert m["gather"] >= 0.8 * m["full"], m  # the probe sees a full state being allocated


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from torch.distributed.checkpoint import filesystem
    from swamla.train_config import TrainConfig
    from swamla_torch.train import train

    real = filesystem.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):  # in DCP's background thread
        if ".step_00000004.tmp-" in str(self.path):
            real(self, plan, planner).wait()  # this rank's shards are on disk, not the metadata
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, plan, planner)

    filesystem.FileSystemWriter.write_data = write_then_die
    train(TrainConfig.load(sys.argv[1]))
""")


def test_kill_during_an_async_save_resumes_from_the_last_complete(shards, tmp_path):
    """kill -9 while step 4's shards are written: step 2 is the newest checkpoint, the partial
    one is ignored and then removed, and the resumed run has the uninterrupted run's losses."""
    straight = make_cfg(shards, tmp_path / "straight", save_interval=2, eval_interval=100)
    train(straight)
    killed = straight.replace(output_dir=str(tmp_path / "killed"))
    killed.save(tmp_path / "killed.json")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, tmp_path / "killed.json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    partial = [p for p in ckpts.iterdir() if p.name.startswith(".step_00000004.tmp-")]
    assert len(partial) == 1 and list(partial[0].glob("*.distcp"))
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [2]
    result = train(killed)
    assert result["step"] == 6 and not partial[0].exists()
    assert_losses_continue(tmp_path / "killed", tmp_path / "straight", [1, 2, 3, 4, 5, 6])


def test_full_disk_during_an_async_save(shards, tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    real = filesystem.FileSystemWriter.write_data

    def disk_full_at_step_4(self, plan, planner):
        if ".step_00000004.tmp-" in str(self.path):
            raise OSError(28, "No space left on device")
        return real(self, plan, planner)

    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", disk_full_at_step_4)
    cfg = make_cfg(shards, tmp_path / "run", save_interval=2, eval_interval=100)
    with pytest.raises(TrainingError, match=r"^could not save the checkpoint of step 4 in "
                       r".*checkpoints: .*No space left on device.* The last good checkpoint, "
                       r".*step_00000002, is intact"):
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_00000002"]
    assert load_checkpoint(step_dir(tmp_path / "run", 2)).step == 2


def test_portable_state_and_old_checkpoints(shards, tmp_path):
    """The run ends with a portable training state; a sharded checkpoint exports to one (read
    and written one tensor at a time) holding its exact tensors, and a checkpoint in that
    format (every PyTorch checkpoint before the sharded ones) resumes exactly."""
    straight = make_cfg(shards, tmp_path / "straight", save_interval=2, eval_interval=100,
                        keep_checkpoints=0, bf16_moments=True)
    train(straight)
    final = step_dir(tmp_path / "straight", 6)
    assert ts.is_train_state(final) and (final / "rng.pt").is_file()
    sharded = step_dir(tmp_path / "straight", 2)
    assert is_sharded_checkpoint(sharded) and not ts.is_train_state(sharded)
    shapes, read = sharded_reader(sharded)
    state = export_train_state(sharded, tmp_path / "state")
    _, params, moments, meta = ts.load_train_state(state)
    assert meta["step"] == 2 and set(params) == set(shapes)
    for name, value in {**params, **moments}.items():
        np.testing.assert_array_equal(value, read(name), err_msg=name)
    assert np.abs(moments["transformer.wte.weight.exp_avg_sq"]).sum() > 0
    # a run directory whose newest checkpoint is sharded (mid-run): swamla-convert reads it
    from swamla.convert_cli import read_tensors

    midrun = tmp_path / "midrun"
    shutil.copytree(tmp_path / "straight", midrun)
    shutil.rmtree(step_dir(midrun, 6))
    newest = sharded_reader(step_dir(midrun, 4))[1]
    model, tensors = read_tensors(midrun)
    assert model == straight.model and set(tensors) == set(shapes)
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, newest(name), err_msg=name)
    # an old run: its checkpoint is a portable training state with rng.pt
    old = tmp_path / "old"
    old.mkdir()
    straight.replace(output_dir=str(old)).save_to_run(old)
    shutil.copytree(state, step_dir(old, 2))
    shutil.copy(sharded / "rng.pt", step_dir(old, 2) / "rng.pt")
    assert train(straight.replace(output_dir=str(old)))["step"] == 6
    assert_losses_continue(old, tmp_path / "straight", [3, 4, 5, 6])


def test_a_failed_conversion_keeps_the_sharded_final_checkpoint(shards, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_mod, "to_train_state", full_disk)
    cfg = make_cfg(shards, tmp_path / "run", max_iters=2, save_interval=100, eval_interval=100)
    with pytest.raises(TrainingError, match=r"checkpoint of step 2 in .*: No space left on device "
                       r"\(errno 28\).* The last good checkpoint, .*step_00000002, is intact"):
        train(cfg)
    assert load_checkpoint(step_dir(tmp_path / "run", 2)).step == 2


def test_checkpoint_benchmark_runs_on_cpu(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_checkpoint

    assert bench_checkpoint.main(["--size", "tiny", "--dir", str(tmp_path / "ckpt"), "--json",
                                  str(tmp_path / "bench.json"), "--portable"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["disk_bytes"] >= result["full_state_bytes"] > 0
    assert result["per_rank"][0]["complete_s"] >= result["per_rank"][0]["blocked_s"] > 0
    assert ts.is_train_state(tmp_path / "ckpt" / "portable")
    assert "| rank | blocked s |" in capsys.readouterr().out


def test_a_portable_state_is_resumed_one_tensor_at_a_time(shards, tmp_path):
    """Resuming from a portable training state (another framework's, or an old checkpoint)
    opens it without reading a tensor, checks its shapes, and reads each tensor on demand."""
    cfg = make_cfg(shards, tmp_path / "run", max_iters=2, save_interval=100, eval_interval=100)
    train(cfg)
    state = step_dir(tmp_path / "run", 2)
    resume = load_checkpoint(state)
    _, params, moments, _ = ts.load_train_state(state)
    opened = ts.open_train_state(state)
    assert set(resume.shapes) == set(params) and set(opened[2]) == set(moments)
    views = {**opened[1], **opened[2]}
    assert all(v.strides == (0,) * v.ndim for v in views.values())  # no tensor read
    assert {k: v.shape for k, v in views.items()} == {
        k: v.shape for k, v in {**params, **moments}.items()}
    for name, value in {**params, **moments}.items():
        np.testing.assert_array_equal(resume.read(name), value, err_msg=name)
    (state / "optimizer.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ts.CheckpointError, match="optimizer.safetensors is truncated or corrupt"):
        load_checkpoint(state)
