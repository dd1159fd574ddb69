"""The JAX and PyTorch trainers keep one contract (``swamla.metrics``): the same records in
metrics.jsonl at the same steps, the same meaning of ``step`` and ``skipped_steps`` when an update
is skipped, and the same keys in what ``train(cfg)`` returns."""

from __future__ import annotations

import dataclasses

import pytest

from swamla.data.synthetic import write_synthetic_shards
from swamla.metrics import EVAL_KEYS, RESULT_KEYS, TRAIN_KEYS, read_metrics
from swamla.schedule import lr_at
from swamla.train_config import parse_args

MARK = 1000  # a token id the synthetic shards never hold: a training batch carrying it is poisoned
POISONED_BATCH = 2  # so step 2 has a non-finite loss and gradient, in both trainers


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest and stable on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"), n_docs=200, seed=0)


def flags(shards, out) -> list[str]:
    return ["--size", "tiny", "--n_layer", "3", "--block_size", "32", "--swa_window", "8",
            "--source", "shards", "--train_paths", str(shards), "--batch_size", "2",
            "--max_iters", "5", "--warmup_iters", "2", "--learning_rate", "3e-3",
            "--min_lr", "3e-4", "--log_interval", "2", "--eval_interval", "3",
            "--eval_iters", "1", "--save_interval", "1000", "--compute_dtype", "float32",
            "--loss_chunk", "0", "--no-export_portable", "--no-progress_bar",
            "--output_dir", str(out)]


class _PoisonedLoader:
    """A training loader whose ``POISONED_BATCH``-th batch has MARK in its targets."""

    def __init__(self, loader):
        self._loader, self._served = loader, 0

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._loader)
        self._served += 1
        if self._served == POISONED_BATCH:
            targets = batch.targets.copy()
            targets[:, 0] = MARK
            batch = dataclasses.replace(batch, targets=targets)
        return batch


def _poison_training(monkeypatch, module):
    """Wrap ``module.build_loader`` so the trainer's train split is a _PoisonedLoader."""
    real = module.build_loader

    def build_loader(cfg, split, **kw):
        loader = real(cfg, split, **kw)
        return _PoisonedLoader(loader) if split == "train" else loader

    monkeypatch.setattr(module, "build_loader", build_loader)


def _run_jax(shards, out, monkeypatch):
    import jax.numpy as jnp

    import swamla_jax.train as t

    _poison_training(monkeypatch, t)
    real = t.Trainer._loss

    def loss(self, params, batch, rng, train):
        value = real(self, params, batch, rng, train)
        return value * jnp.where(jnp.any(batch[1] == MARK), jnp.nan, 1.0) if train else value

    monkeypatch.setattr(t.Trainer, "_loss", loss)
    return t.train(parse_args(flags(shards, out)))


def _run_torch(shards, out, monkeypatch):
    import swamla_torch.model
    import swamla_torch.train as t

    _poison_training(monkeypatch, t)
    real = swamla_torch.model.cross_entropy

    def cross_entropy(logits, targets, *args, **kwargs):
        value = real(logits, targets, *args, **kwargs)
        return value * float("nan") if bool((targets == MARK).any()) else value

    monkeypatch.setattr(swamla_torch.model, "cross_entropy", cross_entropy)
    return t.train(parse_args(flags(shards, out)))


def test_both_trainers_keep_one_contract(shards, tmp_path, monkeypatch):
    results, train_records, eval_records = {}, {}, {}
    for name, run in (("jax", _run_jax), ("torch", _run_torch)):
        with monkeypatch.context() as m:
            results[name] = run(shards, tmp_path / name, m)
        records = read_metrics(tmp_path / name / "metrics.jsonl")
        train_records[name] = [r for r in records if "loss" in r]
        eval_records[name] = [r for r in records if "eval_loss" in r]
        assert len(train_records[name]) + len(eval_records[name]) == len(records), name

    jax_train, torch_train = train_records["jax"], train_records["torch"]
    assert {frozenset(r) for r in jax_train} == {frozenset(r) for r in torch_train} == {
        frozenset({"step", "time", *TRAIN_KEYS})}
    assert {frozenset(r) for r in eval_records["jax"]} == {
        frozenset(r) for r in eval_records["torch"]} == {frozenset({"step", "time", *EVAL_KEYS})}
    # step counts iterations, the skipped step 2 included: the logs are at the same steps.
    assert [r["step"] for r in jax_train] == [r["step"] for r in torch_train] == [2, 4, 5]
    assert [r["step"] for r in eval_records["jax"]] == [
        r["step"] for r in eval_records["torch"]] == [3, 5]
    cfg = parse_args(flags(shards, tmp_path / "unused"))
    for name, recs in train_records.items():
        assert [r["skipped_steps"] for r in recs] == [1, 1, 1], name
        # the schedule counts applied updates: at step s, s - 1 of them; lr is the last one's
        assert [r["lr"] for r in recs] == pytest.approx(
            [lr_at(u, cfg) for u in (0, 2, 3)]), name
        assert all(r["loss"] is not None for r in recs), name  # step 1's loss at step 2

    assert tuple(results["jax"]) == tuple(results["torch"]) == RESULT_KEYS
    for name, result in results.items():
        assert (result["step"], result["skipped_steps"], result["stopped_early"]) == (5, 1, False)
        assert result["checkpoint"] is not None and result["plot"] is not None, name
        assert result["export"] is None, name
        assert result["eval_loss"] == eval_records[name][-1]["eval_loss"], name


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_run_shorter_than_its_warmup_says_so_once(shards, tmp_path, backend, caplog):
    """Once per run, at its start, with what the learning rate does instead (building the
    config, which a run does more than once, says nothing)."""
    import importlib
    import logging
    import warnings

    argv = flags(shards, tmp_path / "run") + ["--max_iters", "2", "--warmup_iters", "10"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from the config itself
        cfg = parse_args(argv)
    with caplog.at_level(logging.WARNING, logger="swamla.schedule"):
        importlib.import_module(f"swamla_{backend}.train").train(cfg)
    said = [r.getMessage() for r in caplog.records if "warmup_iters" in r.getMessage()]
    assert said == [f"warmup_iters (10) > max_iters (2): the learning rate rises linearly for "
                    f"the whole run and its last update uses {lr_at(1, cfg):.3g}, not "
                    f"learning_rate 0.003; set --warmup_iters 2 or less to reach it"]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_require_gpu_refuses_the_cpu_before_training(shards, tmp_path, backend):
    import importlib

    from swamla.config import ConfigError

    out = tmp_path / "run"
    cfg = parse_args(flags(shards, out) + ["--require_gpu"])
    with pytest.raises(ConfigError, match=rf"require_gpu: {backend} (is a CUDA build but found "
                                          "no GPU|has no GPU support installed)"):
        importlib.import_module(f"swamla_{backend}.train").train(cfg)
    assert not (out / "metrics.jsonl").exists()


def test_a_cuda_build_on_the_cpu_says_so_and_the_jax_trainer_names_its_devices(
        shards, tmp_path, caplog):
    import logging

    from swamla.train_config import check_device
    from swamla_jax.train import train

    cfg = parse_args(flags(shards, tmp_path / "run"))
    assert check_device(cfg, backend="jax", on_gpu=True, gpu_build=True) is None
    assert check_device(cfg, backend="torch", on_gpu=False, gpu_build=False) is None
    said = check_device(cfg, backend="jax", on_gpu=False, gpu_build=True)
    assert said.startswith("jax is a CUDA build but found no GPU: training runs on the CPU")
    assert "JAX_PLATFORMS" in said and "--require_gpu makes this an error" in said
    with caplog.at_level(logging.INFO, logger="swamla_jax.train"):
        train(cfg)
    assert any(r.getMessage().startswith("device: cpu x 1 (cpu) in 1 process(es), attention "
                                         "reference") for r in caplog.records)


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "run").write_text("notes") and d / "run", r"run is a file: choose another"),
    (lambda d: (d / "f").write_text("x") and d / "f" / "run", r"run lies under .*f, which is a file"),
    (lambda d: (d / "run").mkdir() or (d / "run" / "metrics.jsonl").write_text("{}") and d / "run",
     r"run holds metrics.jsonl but no train_config.json: it is not a training run's"),
    (lambda d: (d / "run" / "export").mkdir(parents=True) or d / "run",
     r"run holds export but no train_config.json"),
])
def test_an_output_dir_that_is_not_a_runs_is_refused_before_training(shards, tmp_path, backend,
                                                                     make, message):
    import importlib

    from swamla.config import ConfigError

    out = make(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=message):
        importlib.import_module(f"swamla_{backend}.train").train(parse_args(flags(shards, out)))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written or replaced
