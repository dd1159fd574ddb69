"""The PyTorch trainer: optimizer math against optax, end-to-end runs of the tiny preset on
token shards written here, exact resume, non-finite steps, and 2-process DDP against 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import swamla_torch.model
from swamla import train_state as ts
from swamla.data import DataError, ShardWriter
from swamla.metrics import read_metrics
from swamla.portable import load_portable
from swamla.schedule import lr_at
from swamla.train_config import TrainConfig
from swamla_torch import optim
from swamla_torch import train as train_mod
from swamla_torch.checkpoint import load_checkpoint, sharded_reader
from swamla_torch.train import TrainingError, export_train_state, train

REPO = Path(__file__).resolve().parent.parent
VOCAB = 512


@pytest.fixture(autouse=True)
def _quiet_cpu(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest and stable on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Random documents of ids < 500 (EOS 511) as train and val shards of a 512-token vocab."""
    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("val", 40)):
        w = ShardWriter(out, split, tokenizer_name="openai-community/gpt2", vocab_size=VOCAB,
                        eos_id=VOCAB - 1)
        for _ in range(n):
            # a learnable pattern: each document counts up from a random start
            start, length = rng.integers(0, 400), rng.integers(5, 60)
            w.add(np.append(np.arange(start, start + length) % 500, VOCAB - 1))
        w.close()
    return out


def make_cfg(shards, out, model=(), **train):
    fields = {"size": "tiny", "model": {"vocab_size": VOCAB, "n_layer": 3, "block_size": 32,
                                        **dict(model)},
              "data": {"source": "shards", "train_paths": [str(shards)], "prefetch": 2},
              "batch_size": 2, "max_iters": 6, "warmup_iters": 2, "learning_rate": 3e-3,
              "min_lr": 1e-4, "compute_dtype": "float32", "eval_interval": 3, "eval_iters": 2,
              "save_interval": 3, "log_interval": 1, "progress_bar": False,
              "output_dir": str(out), **train}
    return TrainConfig.from_dict(fields)


def losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl")
            if "loss" in r}


def exported(out):
    return load_portable(Path(out) / "export")[1]


def assert_params_equal(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


# ---------------------------------------------------------------------- optimizer math vs optax
def _problem(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"transformer.wte.weight": (6, 4), "transformer.h.0.attn.q_proj.weight": (4, 4),
              "transformer.h.0.norm1.weight": (4,), "transformer.h.0.attn.q_proj.bias": (4,)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: (rng.standard_normal(s) * 0.5).astype(np.float32) for k, s in shapes.items()}
             for _ in range(4)]
    return params, grads


def _run_optax(make, params, grads, mask_fn, clip=None):
    import jax
    import jax.numpy as jnp
    import optax

    with jax.default_device(jax.devices("cpu")[0]):
        tx = make(mask={k: mask_fn(k, v) for k, v in params.items()})
        if clip:
            tx = optax.chain(optax.clip_by_global_norm(clip), tx)
        p = {k: jnp.asarray(v) for k, v in params.items()}
        state = tx.init(p)
        for g in grads:
            updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
            p = optax.apply_updates(p, updates)
        return {k: np.asarray(v) for k, v in p.items()}


def _run_torch(opt_factory, params, grads, sched, clip=0.0):
    ps = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = opt_factory(optim.param_groups(ps.items(), 0.1))
    for step, g in enumerate(grads):
        for k, p in ps.items():
            p.grad = torch.from_numpy(g[k].copy())
        norm = optim.global_grad_norm(list(ps.values())).item()
        optim.clip_grads_(list(ps.values()), norm, clip)
        for group in opt.param_groups:
            group["lr"] = sched(step)
        opt.step()
    return {k: p.detach().numpy() for k, p in ps.items()}


class _Sched:
    learning_rate, min_lr, warmup_iters, max_iters = 1e-2, 1e-3, 2, 4


@pytest.mark.parametrize("which", ["torch.optim.AdamW", "optim.AdamW", "optim.Lion"])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_optimizers_match_optax(which, clip):
    import optax

    params, grads = _problem()
    sched = lambda step: lr_at(step, _Sched)  # noqa: E731
    if "Lion" in which:
        # small betas, so the momentum decides many signs and swapping them shows
        make = lambda mask: optax.lion(sched, b1=0.6, b2=0.3, weight_decay=0.1, mask=mask)  # noqa
        factory = lambda g: optim.Lion(g, betas=(0.6, 0.3))  # noqa: E731
    else:
        make = lambda mask: optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,  # noqa
                                        mask=mask)
        factory = ((lambda g: torch.optim.AdamW(g, betas=(0.9, 0.95), eps=1e-8, foreach=True))
                   if which.startswith("torch") else
                   (lambda g: optim.AdamW(g, betas=(0.9, 0.95), eps=1e-8)))
    want = _run_optax(make, params, grads, lambda k, v: optim.decays(k, torch.empty(v.shape)),
                      clip=clip or None)
    got = _run_torch(factory, params, grads, sched, clip)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=2e-7, err_msg=k)
        assert not np.array_equal(got[k], params[k])


def test_clip_matches_optax():
    import jax.numpy as jnp
    import optax

    _, grads = _problem()
    g = {k: v * 1e-3 for k, v in grads[0].items()}  # a small norm, where torch's +1e-6 would show
    norm_want = float(optax.tree.norm({k: jnp.asarray(v) for k, v in g.items()}))
    for max_norm in (0.5 * norm_want, 2 * norm_want):
        want, _ = optax.clip_by_global_norm(max_norm).update(
            {k: jnp.asarray(v) for k, v in g.items()}, None)
        ps = [torch.nn.Parameter(torch.zeros(v.shape)) for v in g.values()]
        for p, v in zip(ps, g.values()):
            p.grad = torch.from_numpy(v.copy())
        norm = optim.global_grad_norm(ps).item()
        assert norm == pytest.approx(norm_want, rel=1e-6)
        assert optim.clip_grads_(ps, norm, max_norm) == (max_norm < norm)
        for p, k in zip(ps, g):
            np.testing.assert_allclose(p.grad.numpy(), np.asarray(want[k]), rtol=5e-7, atol=0)


def test_weight_decay_groups():
    model = swamla_torch.model.SWAMLA(make_cfg("x", "y", model={"bias": True,
                                                                "use_dyt": True}).model)
    groups = optim.param_groups(model.named_parameters(), 0.1)
    decayed, plain = groups[0]["names"], groups[1]["names"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "transformer.h.0.attn.q_proj.weight" in decayed
    assert "transformer.wte.weight" in plain and "transformer.ln_f.alpha" in plain
    assert all(n.endswith(("bias", "alpha")) or "norm" in n or "ln_f" in n or "wte" in n
               for n in plain)
    assert len(decayed) + len(plain) == len(list(model.parameters()))


def test_stochastic_rounding_lets_bf16_moments_decay():
    x = torch.full((20000,), 1.0)
    gen = torch.Generator().manual_seed(0)
    nearest = stochastic = x.to(torch.bfloat16)
    for _ in range(500):
        nearest = (nearest.float() * 0.999).to(torch.bfloat16)
        stochastic = optim.stochastic_round_bf16(stochastic.float() * 0.999, gen)
    assert nearest.float().mean().item() == 1.0  # round to nearest stalls
    assert stochastic.float().mean().item() == pytest.approx(0.999**500, rel=0.01)


@pytest.mark.parametrize("cls", [optim.AdamW, optim.Lion])
def test_bf16_moments_track_float32(cls):
    params, grads = _problem(1)
    sched = lambda step: 1e-2  # noqa: E731
    ref = _run_torch(lambda g: cls(g, betas=(0.9, 0.95)), params, grads, sched)
    got = _run_torch(lambda g: cls(g, betas=(0.9, 0.95), bf16_moments=True), params, grads, sched)
    for k in params:
        np.testing.assert_allclose(got[k], ref[k], atol=0.02 if cls is optim.Lion else 5e-3)


# ---------------------------------------------------------------------- end to end
def test_train_end_to_end(shards, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(shards, out, max_iters=8, save_interval=2, keep_checkpoints=2,
                   gradient_accumulation_steps=2, log_interval=4, eval_interval=4,
                   learning_rate=1e-2)
    result = train(cfg)
    assert result["step"] == 8 and result["skipped_steps"] == 0 and not result["stopped_early"]
    records = read_metrics(out / "metrics.jsonl")
    train_recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_recs] == [4, 8]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] < 6.3
    assert {"lr", "grad_norm", "tokens_per_s", "skipped_steps"} <= set(train_recs[0])
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["eval_perplexity"] == pytest.approx(np.exp(evals[-1]["eval_loss"]))
    assert result["eval_loss"] == evals[-1]["eval_loss"]
    assert (out / "loss.png").stat().st_size > 1000
    assert TrainConfig.load(out / "train_config.json") == cfg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006",
                                                                      "step_00000008"]
    _, params, moments, meta = ts.load_train_state(out / "checkpoints" / "step_00000008")
    assert meta["step"] == 8 and meta["framework"] == "torch"
    assert meta["data_state"]["batch"] == 16  # 8 steps x 2 micro-batches
    assert_params_equal(params, exported(out))
    assert np.abs(moments["transformer.wte.weight.exp_avg_sq"]).sum() > 0


class _StopAfter:
    """StopSignal stand-in whose flag rises after ``n`` polls: a SIGTERM at a known step."""

    n = 3

    def __init__(self):
        self.polls = 0

    @property
    def should_stop(self):
        self.polls += 1
        return self.polls > self.n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.mark.parametrize("options", [
    dict(model={"dropout": 0.1}, gradient_accumulation_steps=2),
    dict(optimizer_type="lion", bf16_moments=True, learning_rate=3e-4),
    dict(bf16_moments=True),
], ids=["adamw-dropout-accum", "lion-bf16", "adamw-bf16"])
def test_stop_and_resume_is_exact(shards, tmp_path, monkeypatch, options):
    straight = make_cfg(shards, tmp_path / "straight", **options)
    train(straight)
    stopped = straight.replace(output_dir=str(tmp_path / "stopped"))
    with monkeypatch.context() as m:
        m.setattr(train_mod, "StopSignal", _StopAfter)
        first = train(stopped)
    assert first["stopped_early"] and first["step"] == 4  # stop seen in step 4: saved at 4
    assert not (tmp_path / "stopped" / "export").exists()
    assert sorted(losses(tmp_path / "stopped")) == [1, 2, 3, 4]
    second = train(stopped)  # resume="auto"
    assert second["step"] == 6 and not second["stopped_early"]
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    assert_params_equal(exported(tmp_path / "stopped"), exported(tmp_path / "straight"))


def test_resume_from_exported_training_state(shards, tmp_path):
    """The cross-framework path: a portable state (no torch RNG) continues the run exactly."""
    straight = make_cfg(shards, tmp_path / "straight")
    train(straight)
    ckpt = tmp_path / "straight" / "checkpoints" / "step_00000003"
    assert ts.main(["export-torch", str(ckpt), str(tmp_path / "state")]) == 0
    assert not (tmp_path / "state" / "rng.pt").exists()
    meta = json.loads((tmp_path / "state" / "trainer_state.json").read_text())
    meta["framework"] = "jax"  # as the JAX trainer would write it
    (tmp_path / "state" / "trainer_state.json").write_text(json.dumps(meta))
    result = train(straight.replace(output_dir=str(tmp_path / "moved"),
                                    resume=str(tmp_path / "state")))
    assert result["step"] == 6
    want = losses(tmp_path / "straight")
    assert losses(tmp_path / "moved") == {s: want[s] for s in (4, 5, 6)}
    assert_params_equal(exported(tmp_path / "moved"), exported(tmp_path / "straight"))
    # export_train_state writes a (sharded) checkpoint's tensors exactly
    export_train_state(ckpt, tmp_path / "again")
    _, params, moments, meta2 = ts.load_train_state(tmp_path / "again")
    read = sharded_reader(ckpt)[1]
    assert_params_equal({**params, **moments}, {k: read(k) for k in {**params, **moments}})
    assert load_checkpoint(ckpt).meta == meta2


def test_resume_errors(shards, tmp_path):
    cfg = make_cfg(shards, tmp_path / "a", max_iters=3, export_portable=False)
    train(cfg)
    with pytest.raises(ValueError, match="holds adamw moments but optimizer_type is 'lion'"):
        train(cfg.replace(optimizer_type="lion", max_iters=6))
    with pytest.raises(ValueError, match="neither a training state"):
        train(cfg.replace(output_dir=str(tmp_path / "b"), resume=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="n_embd=64 there, 32 in this run"):
        train(cfg.replace(model=cfg.model.replace(n_embd=32, mlp_hidden_dim=128), max_iters=6))
    # Same shapes, another function: the window is not in any tensor's shape.
    with pytest.raises(ValueError, match="swa_window=32 there, 4 in this run"):
        train(cfg.replace(model=cfg.model.replace(swa_window=4), max_iters=6))
    # Training-only model fields may change.
    assert train(cfg.replace(model=cfg.model.replace(dropout=0.1), max_iters=4))["step"] == 4


def test_relaunching_an_imported_run_never_rewinds_it(shards, tmp_path):
    """A run begun with --resume STATE: launching it again must not go back to STATE. The same
    command is refused (output_dir holds newer checkpoints) and the saved config continues."""
    start = make_cfg(shards, tmp_path / "a", max_iters=3, export_portable=False)
    train(start)
    moved = start.replace(output_dir=str(tmp_path / "b"), max_iters=4,
                          resume=str(tmp_path / "a" / "checkpoints" / "step_00000003"))
    assert train(moved)["step"] == 4
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(moved.replace(max_iters=5))
    with pytest.raises(ValueError, match=r"one of this run's own checkpoints .* move the newer "
                                         r"checkpoints out of .*/a/checkpoints \(mv"):
        train(start.replace(max_iters=5, resume=str(tmp_path / "a" / "checkpoints"
                                                    / "step_00000003")))
    with pytest.raises(ValueError, match="resume=none but"):
        train(moved.replace(max_iters=5, resume="none"))
    saved = TrainConfig.load(tmp_path / "b" / "train_config.json")
    assert saved.resume == "auto"
    stale = tmp_path / "b" / "checkpoints" / ".step_00000005.tmp-0a1b2c3d"  # a kill mid-save
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    assert train(saved.replace(max_iters=5))["step"] == 5
    assert not stale.exists()
    assert sorted(losses(tmp_path / "b")) == [4, 5]


def test_an_empty_validation_split_fails_before_training(tmp_path):
    docs = tmp_path / "docs.jsonl"  # one document: none can be held out for validation
    docs.write_text(json.dumps({"text": "document " * 40}) + "\n")
    cfg = TrainConfig.from_dict({
        "size": "tiny", "model": {"n_layer": 3, "block_size": 32},
        "data": {"source": "files", "train_paths": [str(docs)], "num_workers": 0},
        "batch_size": 2, "max_iters": 4, "compute_dtype": "float32", "progress_bar": False,
        "output_dir": str(tmp_path / "run")})
    with pytest.raises(DataError, match="no documents in the 'val' split"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was trained


def test_a_failed_save_names_the_checkpoint_that_is_intact(shards, tmp_path, monkeypatch):
    real, calls = train_mod.save_checkpoint, []

    def disk_full_on_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "save_checkpoint", disk_full_on_second_save)
    cfg = make_cfg(shards, tmp_path / "run", eval_interval=100, export_portable=False)
    with pytest.raises(TrainingError, match=r"checkpoint of step 6 in .*checkpoints: No space left "
                       r"on device \(errno 28\): it needs about [\d.]+ MiB, .* free there\. The "
                       r"last good checkpoint, .*step_00000003, is intact: free space"):
        train(cfg)


def _nan_after(monkeypatch, bad_calls):
    real, calls = swamla_torch.model.cross_entropy, []

    def flaky(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) in bad_calls else loss

    monkeypatch.setattr(swamla_torch.model, "cross_entropy", flaky)


def test_non_finite_steps_are_skipped(shards, tmp_path, monkeypatch):
    """Skipped steps count in ``step`` (the run still stops at max_iters) and in skipped_steps;
    the schedule runs on the updates applied."""
    _nan_after(monkeypatch, {2, 3})  # the 2nd and 3rd training batches
    result = train(make_cfg(shards, tmp_path / "run", eval_interval=100))
    assert result["step"] == 6 and result["skipped_steps"] == 2
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["skipped_steps"]) for r in records if r["loss"] is None] == [(2, 1),
                                                                                     (3, 2)]
    cfg = make_cfg(shards, tmp_path / "unused")
    assert [r["lr"] for r in records] == pytest.approx(
        [lr_at(u, cfg) for u in (0, 0, 0, 1, 2, 3)])  # the rate of the last applied update
    assert all(np.isfinite(v).all() for v in exported(tmp_path / "run").values())
    meta = ts.load_train_state(tmp_path / "run" / "checkpoints" / "step_00000006")[3]
    assert (meta["step"], meta["bad_steps"]) == (6, 2)


def test_too_many_bad_steps_stop_with_error(shards, tmp_path, monkeypatch):
    _nan_after(monkeypatch, set(range(5, 100)))
    cfg = make_cfg(shards, tmp_path / "run", max_bad_steps=3, save_interval=2, eval_interval=100,
                   max_iters=10)
    with pytest.raises(TrainingError, match=r"3 consecutive non-finite steps \(max_bad_steps=3\) "
                       r"at step 7; stopping. The last good checkpoint is kept \(.*step_00000006\)"):
        train(cfg)
    meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000006").meta
    assert (meta["step"], meta["bad_steps"]) == (6, 2)


def test_token_ids_checked_on_host(shards, tmp_path):
    cfg = make_cfg(shards, tmp_path / "run", model={"vocab_size": 256})
    with pytest.raises(DataError, match=r"val batch after step 0: token ids must lie in "
                       r"\[0, 256\)"):
        train(cfg)


def test_attention_impl_of_the_other_backend(shards, tmp_path):
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        train(make_cfg(shards, tmp_path / "run", attention_impl="cudnn"))


def test_cli_errors(shards, tmp_path, capsys):
    import train_torch

    assert train_torch.main(["--bogus_flag", "1"]) == 2
    assert "error: unknown argument" in capsys.readouterr().err
    assert train_torch.main(["--size", "tiny", "--source", "shards", "--train_paths",
                             str(tmp_path / "missing"), "--output_dir", str(tmp_path)]) == 2
    assert "error: train_paths:" in capsys.readouterr().err


# ---------------------------------------------------------------------- DDP
@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["DDP", "FSDP2"])
def test_two_processes_match_one(shards, tmp_path, wrap):
    """gloo DDP or FSDP2 over 2 ranks (batch 2 each, 2 micro-batches) == 1 process with batch 4:
    losses, evaluation, exported weights and a resumable checkpoint."""
    one = make_cfg(shards, tmp_path / "one", batch_size=4, gradient_accumulation_steps=2,
                   max_iters=4, eval_interval=2)
    train(one)
    two = one.replace(batch_size=2, output_dir=str(tmp_path / "two"), fsdp=wrap == "FSDP2")
    two.save(tmp_path / "two.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train_torch.py"), "--config", str(tmp_path / "two.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"({wrap})" in proc.stdout + proc.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=0, atol=1e-6)
    evals = [[r["eval_loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl")
              if "eval_loss" in r] for d in ("one", "two")]
    np.testing.assert_allclose(evals[1], evals[0], atol=1e-6)
    assert_params_equal(exported(tmp_path / "two"), exported(tmp_path / "one"), atol=1e-6)
    # a 2-process checkpoint resumes in one process (the data state is global)
    meta = ts.load_train_state(tmp_path / "two" / "checkpoints" / "step_00000004")[3]
    assert meta["data_state"]["global_rows"] == 4


@pytest.mark.parametrize("variant", ["plain", "dropout", "chunked_loss", "checkpointing", "flex"])
def test_compiled_model_has_no_graph_breaks(variant):
    """torch.compile sees one graph for the whole model: no host sync or Python-side branch on
    data splits it (the model's own token-id check steps aside while compiling)."""
    from swamla.config import load_preset

    from swamla.plan import resolve_plan

    cfg = load_preset("tiny", dropout=0.1 if variant == "dropout" else 0.0)
    plan = resolve_plan("torch", on_gpu=False, dropout=cfg.dropout,
                        compute_dtype="bfloat16" if variant == "flex" else "float32",
                        attention_impl="flex" if variant == "flex" else "auto",
                        loss_chunk=16 if variant == "chunked_loss" else 0,
                        remat_policy="full" if variant == "checkpointing" else "none")
    assert plan.attention_impl == ("flex" if variant == "flex" else "reference")
    model = swamla_torch.model.SWAMLA(cfg, plan).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 64))
    grad = torch.enable_grad()
    if variant == "flex":  # FlexAttention's backward needs a GPU; its forward traces anywhere
        model, grad = model.to(torch.bfloat16).eval(), torch.no_grad()
    torch._dynamo.reset()
    with grad:
        explained = torch._dynamo.explain(model)(idx, idx)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_chunked_loss_makes_each_chunks_logits_once():
    """With a gradient wanted, the head runs three vocabulary-sized matmuls a chunk in the forward
    pass (the logits and the two gradients from them) and none in the backward pass; without,
    only the logits one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from swamla.config import load_preset
    from swamla.plan import ComputePlan

    cfg = load_preset("tiny", n_layer=2)
    V = cfg.vocab_size

    class VocabMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm):
                self.count += any(V in a.shape for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    model = swamla_torch.model.SWAMLA(cfg, ComputePlan(loss_chunk=16))
    idx = torch.randint(0, V, (2, 64))  # 4 chunks
    with VocabMatmuls() as fwd:
        loss = model(idx, idx)[1]
    with VocabMatmuls() as bwd:
        loss.backward()
    with torch.no_grad(), VocabMatmuls() as evaluation:
        eval_loss = model(idx, idx)[1]
    assert (fwd.count, bwd.count, evaluation.count) == (12, 0, 4)
    torch.testing.assert_close(eval_loss, loss.detach(), rtol=1e-6, atol=0)
