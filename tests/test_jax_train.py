"""The JAX trainer end to end on CPU: sharded runs match one device, accumulation matches one big
batch, kill-and-resume is exact (also onto another device count), non-finite steps are skipped.

Multi-device runs use simulated CPU devices (``--xla_force_host_platform_device_count``), which
must be set before JAX starts, so they run ``train`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from swamla.data.synthetic import write_synthetic_shards
from swamla.metrics import read_metrics
from swamla.train_config import parse_args

ROOT = Path(__file__).resolve().parent.parent


def write_shards(directory: Path) -> Path:
    return write_synthetic_shards(directory, n_docs=400, seed=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


def flags(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--size", "tiny", "--n_layer", "4", "--block_size", "32", "--swa_window", "8",
            "--source", "shards", "--train_paths", str(shards), "--batch_size", "2",
            "--max_iters", "8", "--warmup_iters", "2", "--learning_rate", "3e-3",
            "--min_lr", "3e-4", "--log_interval", "1", "--eval_interval", "1000",
            "--eval_iters", "2", "--save_interval", "1000", "--compute_dtype", "float32",
            "--no-progress_bar", "--output_dir", str(out), *extra]


def losses(out: Path) -> np.ndarray:
    return np.array([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r])


def run_in_subprocess(argv: list[str], devices: int, *, hook: str = "") -> None:
    """``train(parse_args(argv))`` in a fresh interpreter with ``devices`` simulated devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    code = textwrap.dedent(f"""
        import sys
        from swamla.train_config import parse_args
        import swamla_jax.train as t
        {hook}
        t.train(parse_args({argv!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ------------------------------------------------------------------------------ in-process
def test_tiny_run_learns_and_writes_everything(shards, tmp_path):
    from swamla_jax.train import train

    out = tmp_path / "run"
    result = train(parse_args(flags(shards, out, "--max_iters", "30", "--eval_interval", "15")))
    curve = losses(out)
    assert len(curve) == 30 and curve[-5:].mean() < curve[:5].mean() - 1.0, curve
    assert result["step"] == 30 and np.isfinite(result["eval_loss"])
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "30" / "state").is_dir()
    assert json.loads((out / "train_config.json").read_text())["max_iters"] == 30
    import swamla_jax as sj
    exported = sj.load_pretrained(out / "export")  # a portable checkpoint, loadable anywhere
    assert exported.config.n_layer == 4
    # The run directory itself is a source for the converter and the generate commands.
    from swamla.convert_cli import read_tensors
    cfg, tensors = read_tensors(out)
    assert cfg == exported.config
    for k, v in sj.to_portable_tensors(cfg, exported.params).items():
        np.testing.assert_array_equal(tensors[k], v)


@pytest.mark.parametrize("documents", [False, True])
def test_accumulation_matches_one_big_batch(shards, documents):
    """k micro-batches of B rows in one step == one micro-batch of k*B rows (also with the
    segment ids of packed documents)."""
    import jax

    from swamla.data.packing import segment_ids
    from swamla_jax import sharding
    from swamla_jax.train import Trainer

    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 50257, (8, 32)).astype(np.int32)
    inputs[rng.random(inputs.shape) < 0.1] = 50256
    targets = rng.integers(0, 50257, (8, 32)).astype(np.int32)
    arrays = (inputs, targets) + ((segment_ids(inputs, 50256),) if documents else ())
    results = []
    for k, b in ((1, 8), (4, 2)):
        cfg = parse_args(flags(shards, Path("unused"), "--batch_size", str(b),
                               "--gradient_accumulation_steps", str(k)))
        mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        with jax.set_mesh(mesh):
            trainer = Trainer(cfg, mesh)
            state = trainer.init_state()
            batch = tuple(a.reshape(k, b, 32) for a in arrays)
            curve = []
            for _ in range(3):
                state, metrics = trainer.train_step(state, batch)
                curve.append((float(metrics["loss"]), float(metrics["grad_norm"])))
            results.append((np.array(curve), jax.device_get(state.params)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)  # losses, grad norms
    # Adam turns float32 rounding of near-zero gradients into +-lr steps, so parameters are
    # compared at the scale of one update (lr 3e-3), not at the gradients' 1e-5.
    for a, b in zip(jax.tree_util.tree_leaves(results[0][1]), jax.tree_util.tree_leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("extra", [(), ("--doc_mask",)])
def test_sigterm_saves_and_resume_is_exact(shards, tmp_path, monkeypatch, extra):
    """A real SIGTERM mid-run saves and exits; resuming gives the uninterrupted loss sequence
    (also with packed documents kept apart)."""
    import swamla_jax.train as t

    t.train(parse_args(flags(shards, tmp_path / "straight", "--max_iters", "12", *extra)))
    calls = {"n": 0}
    original = t._next_batch

    def kill_at_step_5(loader, *args):
        calls["n"] += loader.split == "train"
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(loader, *args)

    monkeypatch.setattr(t, "_next_batch", kill_at_step_5)
    out = tmp_path / "interrupted"
    stopped = t.train(parse_args(flags(shards, out, "--max_iters", "12", *extra)))
    assert stopped["step"] == 5 and (out / "checkpoints" / "5").is_dir()
    assert not (out / "export").exists()  # an unfinished run exports nothing
    monkeypatch.setattr(t, "_next_batch", original)
    t.train(parse_args(flags(shards, out, "--max_iters", "12", *extra)))
    np.testing.assert_array_equal(losses(out), losses(tmp_path / "straight"))


def test_metrics_are_read_one_step_behind(shards, tmp_path, monkeypatch):
    """The host waits for a step's metrics only once the next step is queued, log steps included,
    so logging every step leaves no gap on the device; only the first (compilation) and the last
    step (eval, save) wait."""
    import swamla_jax.train as t

    queued, read_with_queued = [0], []

    class CountingTrainer(t.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            step = self.train_step

            def queue(*a):
                queued[0] += 1
                return step(*a)
            self.train_step = queue

    check = t._check_finite

    def counting_check(*args):
        read_with_queued.append(queued[0])
        return check(*args)

    monkeypatch.setattr(t, "Trainer", CountingTrainer)
    monkeypatch.setattr(t, "_check_finite", counting_check)
    t.train(parse_args(flags(shards, tmp_path / "run")))  # log_interval 1, 8 steps
    assert read_with_queued == [1, 3, 4, 5, 6, 7, 8, 8]  # the first step waits: compilation
    assert len(losses(tmp_path / "run")) == 8


def test_resume_none_refuses_to_clobber(shards, tmp_path):
    from swamla.config import ConfigError
    from swamla_jax.train import train

    out = tmp_path / "run"
    train(parse_args(flags(shards, out, "--max_iters", "2")))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(parse_args(flags(shards, out, "--resume", "none")))


def test_a_resume_that_cannot_continue_the_run_leaves_it_as_it_was(shards, tmp_path):
    """Another model (same shapes), another optimizer state or a checkpoint path over existing
    checkpoints: refused with the reason, before train_config.json is touched. A damaged newest
    checkpoint is named, and moving it away as the error says resumes from the one before."""
    from swamla.config import ConfigError
    from swamla.portable import CheckpointError
    from swamla_jax.train import train

    out = tmp_path / "run"
    train(parse_args(flags(shards, out, "--max_iters", "2", "--save_interval", "1")))
    saved = (out / "train_config.json").read_text()
    for extra, match in ((("--swa_window", "4"), "swa_window=8 there, 4 in this run"),
                         (("--optimizer_type", "lion"), "holds adamw moments but "
                                                        "optimizer_type is 'lion'"),
                         (("--bf16_moments",), "bf16_moments=False, this run has True"),
                         (("--resume", str(out / "checkpoints" / "1")),
                          r"one of this run's own checkpoints \(latest: step 2\): to go back to "
                          r"it, move the newer checkpoints out of .*checkpoints")):
        with pytest.raises(ConfigError, match=match):
            train(parse_args(flags(shards, out, "--max_iters", "3", *extra)))
        assert (out / "train_config.json").read_text() == saved
    (out / "checkpoints" / "2" / "meta" / "metadata").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoints/2 cannot be read .* it is incomplete "
                       r"or damaged. Move it out of the way \(mv .*\) to resume from step 1"):
        train(parse_args(flags(shards, out, "--max_iters", "3")))
    (out / "checkpoints" / "2").rename(out / "broken_step_2")
    killed = out / "checkpoints" / "3.orbax-checkpoint-tmp-1764300000000000"  # a save killed
    (killed / "state").mkdir(parents=True)
    assert train(parse_args(flags(shards, out, "--max_iters", "3")))["step"] == 3
    assert not killed.exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_a_full_disk_names_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    """Once step 1 is saved, the file system refuses large files (RLIMIT_FSIZE: the write fails
    with EFBIG, as it would with ENOSPC on a full disk). Orbax's asynchronous write of step 2
    fails; train_jax.py names that step and step 1 as intact, and a resume continues from it."""
    from swamla_jax.train import train

    out = tmp_path / "run"
    argv = flags(shards, out, "--max_iters", "3", "--save_interval", "1")
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from swamla_jax import checkpoint
        from train_jax import main

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        save = checkpoint.Checkpointer.save

        def save_then_fill_the_disk(self, step, *args, **kwargs):
            save(self, step, *args, **kwargs)
            if step == 1:
                self.wait()
                resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

        checkpoint.Checkpointer.save = save_then_fill_the_disk
        sys.exit(main({argv!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 1, proc.stderr[-4000:]
    ckpts = out / "checkpoints"
    # One line besides log records: not Orbax's and tensorstore's tracebacks from their threads.
    errors = [line for line in proc.stderr.splitlines()
              if not re.match(r"\d{4}-\d\d-\d\d [\d:,]+ \w", line)]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert re.fullmatch(
        rf"error: could not save the checkpoint of step 2 in {ckpts}: File too large \(errno "
        rf"27\): it needs about [\d.]+ MiB, [\d.]+ [MG]iB free there\. The last good checkpoint, "
        rf"{ckpts / '1'}, is intact: free space \(or point --output_dir elsewhere\) and resume "
        r"with --resume auto", errors[0]), errors[0]
    assert train(parse_args(argv))["step"] == 3  # resumed from step 1, the partial save cleared
    assert sorted(p.name for p in ckpts.iterdir()) == ["1", "2", "3"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_an_empty_validation_split_fails_before_training(tmp_path):
    from swamla.data import DataError
    from swamla_jax.train import train

    docs = tmp_path / "docs.jsonl"  # one document: none can be held out for validation
    docs.write_text(json.dumps({"text": "document " * 40}) + "\n")
    argv = flags(docs, tmp_path / "run", "--source", "files", "--num_workers", "0")
    with pytest.raises(DataError, match="no documents in the 'val' split"):
        train(parse_args(argv))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "train_config.json").exists()


def test_non_finite_steps_are_skipped_then_stop(shards, tmp_path, monkeypatch):
    """NaN gradients: the update is skipped and counted; max_bad_steps in a row stop the run."""
    import swamla_jax.train as t

    original = t.Trainer._loss

    def nan_training_loss(self, params, batch, rng, train):
        loss = original(self, params, batch, rng, train)
        return loss * float("nan") if train else loss  # NaN loss, so NaN gradients too

    monkeypatch.setattr(t.Trainer, "_loss", nan_training_loss)
    with pytest.raises(t.NonFiniteError, match=r"3 consecutive non-finite steps \(max_bad_steps=3\) "
                       r"at step 3; stopping. The last good checkpoint is kept"):
        t.train(parse_args(flags(shards, tmp_path / "nan", "--max_bad_steps", "3",
                                 "--save_interval", "1")))
    records = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert records[-1]["skipped_steps"] >= 2
    assert all(r["lr"] >= 0 for r in records if "lr" in r)  # no update yet: the first step's


# ------------------------------------------------------------------------------ multi-device
@pytest.mark.slow
def test_sharded_runs_match_one_device(shards, tmp_path):
    """FSDP, data x FSDP and tensor parallel on 8 simulated devices: one device's losses."""
    base = flags(shards, tmp_path / "one", "--batch_size", "8")
    run_in_subprocess(base, devices=1)
    reference = losses(tmp_path / "one")
    layouts = {"fsdp": ("1", "8", "1"), "data_fsdp": ("2", "4", "1"), "tensor": ("1", "2", "4")}
    for name, (d, f, tp) in layouts.items():
        out = tmp_path / name
        # batch_size is per data-parallel device: keep the global batch at 8 sequences.
        dp = int(d) * int(f)
        run_in_subprocess(flags(shards, out, "--batch_size", str(8 // dp), "--mesh_data", d,
                                "--mesh_fsdp", f, "--mesh_tensor", tp), devices=8)
        np.testing.assert_allclose(losses(out), reference, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_mesh_sizes_that_do_not_divide_the_model(shards, tmp_path):
    """3 and 6 devices (FSDP) do not divide n_embd 64: such dimensions are replicated (with a
    warning) and the run gives one device's losses."""
    argv = lambda out, b: flags(shards, out, "--batch_size", str(b), "--max_iters", "2")  # noqa: E731
    run_in_subprocess(argv(tmp_path / "one", 6), devices=1)
    for devices in (3, 6):
        out = tmp_path / f"fsdp{devices}"
        run_in_subprocess(argv(out, 6 // devices), devices=devices)
        np.testing.assert_allclose(losses(out), losses(tmp_path / "one"), rtol=1e-5,
                                   err_msg=f"{devices} devices")


def test_tensor_parallel_mlp_moves_no_activations():
    """Under tensor parallelism each device holds the up and gate columns of its slice of the
    MLP width (the (C, 2, F) view in swamla_jax.layers.SwiGLU): the compiled step has no
    collective-permute in the MLPs (sharding the flat [up | gate] axis moved half of every MLP
    activation)."""
    code = textwrap.dedent("""
        import re, sys
        sys.path.insert(0, "benchmarks")
        from bench_train import jax_setup
        with jax_setup("tiny", 128, 2, "bf16", "none", ["mesh_fsdp=2", "mesh_tensor=2"], 4) as (
                trainer, state, batch, mesh):
            hlo = trainer.train_step.lower(state, batch).compile().as_text()
        ops = [m.group(0) for m in re.finditer(
            r"(collective-permute|all-reduce|all-gather)(?:-start)?\\(.*", hlo)]
        mlp = [o for o in ops if o.startswith("collective-permute") and re.search(r"/(mlp|ffn)/", o)]
        print(len(ops), len(mlp))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    n_collectives, n_mlp_permutes = map(int, proc.stdout.split())
    assert n_collectives > 0 and n_mlp_permutes == 0  # a sharded step that moves no MLP halves


@pytest.mark.slow
def test_restore_on_another_device_count(shards, tmp_path):
    """Save on 8 devices (FSDP), continue on 2: the losses of an uninterrupted 8-device run."""
    straight = tmp_path / "straight"
    run_in_subprocess(flags(shards, straight, "--batch_size", "1", "--max_iters", "10"), devices=8)
    moved = tmp_path / "moved"
    stop_at_4 = textwrap.dedent("""
        import os, signal
        _orig, _n = t._next_batch, [0]
        def _hook(loader, *a):
            _n[0] += loader.split == "train"  # the validation split is read once at start
            if _n[0] == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return _orig(loader, *a)
        t._next_batch = _hook
    """).replace("\n", "\n        ")
    run_in_subprocess(flags(shards, moved, "--batch_size", "1", "--max_iters", "10"), devices=8,
                      hook=stop_at_4)
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["4"]
    run_in_subprocess(flags(shards, moved, "--batch_size", "4", "--max_iters", "10"), devices=2)
    np.testing.assert_allclose(losses(moved), losses(straight), rtol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one(shards, tmp_path):
    """Multi-host JAX on one machine: 2 processes x 2 simulated devices through jax.distributed
    (coordinator flags), FSDP over all 4. A SIGTERM to one process stops both at the same step
    with one checkpoint; resumed, they give the losses of a single process on 4 devices."""
    import socket

    single = tmp_path / "single"
    run_in_subprocess(flags(shards, single, "--batch_size", "2"), devices=4)
    multi = tmp_path / "multi"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    # process 1 alone is signalled, while its 5th batch loads (before step 5 is queued)
    sigterm_at_5 = ("import os, signal\n_orig, _n = t._next_batch, [0]\n"
                    "def _hook(loader, *a):\n    _n[0] += loader.split == 'train'\n"
                    "    if _n[0] == 5:\n        os.kill(os.getpid(), signal.SIGTERM)\n"
                    "    return _orig(loader, *a)\nt._next_batch = _hook\n")
    for run in ("interrupted", "resumed"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for pid in range(2):
            argv = flags(shards, multi, "--batch_size", "2", "--coordinator_address",
                         f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(pid))
            hook = sigterm_at_5 if run == "interrupted" and pid == 1 else ""
            code = f"from swamla.train_config import parse_args\nimport swamla_jax.train as t\n" \
                   f"{hook}t.train(parse_args({argv!r}))"
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        for p in procs:
            out, _ = p.communicate(timeout=600)
            assert p.returncode == 0, out[-4000:]
        if run == "interrupted":
            # the processes agree one step after the signal: both save step 6, nothing exported
            assert sorted(d.name for d in (multi / "checkpoints").iterdir()) == ["6"]
            assert not (multi / "export").exists()
    np.testing.assert_allclose(losses(multi), losses(single), rtol=1e-5)
    assert (multi / "checkpoints" / "8").is_dir() and (multi / "export").is_dir()


@pytest.mark.parametrize("variant", [
    ("--gradient_checkpointing", "--remat_policy", "full"),
    ("--gradient_checkpointing", "--remat_policy", "dots_with_no_batch_dims_saveable"),
    ("--scan_layers", "false"),
    ("--scan_layers", "false", "--gradient_checkpointing", "--remat_policy", "full"),
    ("--fuse_projections", "false"),
], ids=["full", "dots_no_batch", "unrolled", "unrolled_full", "separate_projections"])
def test_remat_and_unrolling_do_not_change_the_step(shards, variant):
    """Rematerialization trades memory for compute, unrolling the layer scan trades compile
    time for fusion, fused projections trade narrow GEMMs for one wide one; the loss and
    gradients stay the same."""
    import jax

    from swamla_jax import sharding
    from swamla_jax.train import Trainer

    batch = tuple(np.random.default_rng(1).integers(0, 50257, (1, 2, 32)).astype(np.int32)
                  for _ in range(2))
    curves = []
    for extra in ((), variant):
        cfg = parse_args(flags(shards, Path("unused"), *extra))
        mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        with jax.set_mesh(mesh):
            trainer = Trainer(cfg, mesh)
            state = trainer.init_state()
            curve = []
            for _ in range(2):
                state, m = trainer.train_step(state, batch)
                curve.append((float(m["loss"]), float(m["grad_norm"])))
        curves.append(curve)
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_bf16_moments_train_and_halve_state(shards, tmp_path, optimizer):
    """The original project's "FP8" optimizers: bfloat16 moments (stochastically rounded), float32 params."""
    import jax
    import jax.numpy as jnp

    from swamla_jax import sharding
    from swamla_jax.optim import moments_of
    from swamla_jax.train import Trainer, train

    out = tmp_path / optimizer
    train(parse_args(flags(shards, out, "--max_iters", "20", "--bf16_moments",
                           "--optimizer_type", optimizer, "--learning_rate", "1e-3")))
    curve = losses(out)
    assert curve[-3:].mean() < curve[:3].mean() - 0.5
    cfg = parse_args(flags(shards, out, "--bf16_moments", "--optimizer_type", optimizer))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        mu, nu, _ = moments_of(Trainer(cfg, mesh).state_shapes.opt_state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(mu))
    assert (nu is None) == (optimizer == "lion")


def test_stochastic_rounding_keeps_a_slow_decay_decaying():
    """beta2 = 0.999 in bfloat16: round-to-nearest stalls, stochastic rounding decays on average."""
    import jax
    import jax.numpy as jnp

    from swamla_jax.optim import stochastic_round_bf16

    v_nearest = jnp.ones((4096,), jnp.bfloat16)
    v_stochastic = v_nearest
    key = jax.random.key(0)
    for _ in range(200):
        key, sub = jax.random.split(key)
        v_nearest = (0.999 * v_nearest.astype(jnp.float32)).astype(jnp.bfloat16)
        v_stochastic = stochastic_round_bf16(0.999 * v_stochastic.astype(jnp.float32), sub)
    assert float(v_nearest.mean()) == 1.0  # stalled
    assert abs(float(v_stochastic.astype(jnp.float32).mean()) - 0.999 ** 200) < 5e-3


def test_keeps_the_last_n_checkpoints(shards, tmp_path):
    from swamla_jax.train import train

    out = tmp_path / "keep"
    train(parse_args(flags(shards, out, "--max_iters", "5", "--save_interval", "1",
                           "--keep_checkpoints", "2", "--no-export_portable")))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "5"]
    assert not (out / "export").exists()
