"""Training that crosses frameworks through the portable training state (swamla.train_state).

Both trainers run float32 on CPU from the same weights and the same batches: N AdamW or Lion steps
give the same parameters and losses, and a run moved JAX -> PyTorch (or back) mid-training
continues with the losses of a run that never moved.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import swamla_jax as sj  # noqa: E402
import swamla_torch.train as torch_train  # noqa: E402
from swamla.metrics import read_metrics  # noqa: E402
from swamla.portable import load_portable  # noqa: E402
from swamla.train_config import parse_args  # noqa: E402
from swamla.train_state import load_train_state, save_train_state  # noqa: E402
from swamla_jax import train as jax_train  # noqa: E402
from test_jax_train import write_shards  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("xshards"))


def flags(shards, out, max_iters, optimizer="adamw", *extra):
    return ["--size", "tiny", "--n_layer", "4", "--block_size", "32", "--swa_window", "8",
            "--source", "shards", "--train_paths", str(shards), "--batch_size", "4",
            "--max_iters", str(max_iters), "--warmup_iters", "2", "--learning_rate", "1e-3",
            "--min_lr", "1e-4", "--optimizer_type", optimizer, "--log_interval", "1",
            "--eval_interval", "1000", "--save_interval", "1000", "--compute_dtype", "float32",
            "--attention_impl", "reference", "--loss_chunk", "0", "--no-progress_bar",
            "--output_dir", str(out), *extra]


def losses(out):
    return np.array([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r])


def initial_state(tmp_path, optimizer: str):
    """Step 0: the same random weights and zero moments for both frameworks."""
    cfg = parse_args(flags("x", "x", 5, optimizer)).model
    params = sj.to_portable_tensors(cfg, sj.from_config(cfg, seed=7).params)
    names = ("exp_avg", "exp_avg_sq") if optimizer == "adamw" else ("exp_avg",)
    moments = {f"{k}.{n}": np.zeros_like(v) for k, v in params.items() for n in names}
    meta = {"format": "swamla-train-state", "version": 1, "step": 0, "optimizer_type": optimizer,
            "train_config": {}, "data_state": None, "bad_steps": 0, "framework": "jax"}
    return save_train_state(tmp_path / f"init_{optimizer}", cfg, params, moments, meta)


def final_params(out):
    from swamla.convert_cli import read_tensors

    exported = load_portable(out / "export")[1]
    newest = read_tensors(out)[1]  # the run directory's newest checkpoint, read directly
    assert all(np.array_equal(newest[k], v) for k, v in exported.items())
    return exported


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_same_steps_same_parameters(shards, tmp_path, optimizer):
    init = initial_state(tmp_path, optimizer)
    jax_train.train(parse_args(flags(shards, tmp_path / "jax", 5, optimizer, "--resume", str(init))))
    torch_train.train(parse_args(flags(shards, tmp_path / "torch", 5, optimizer, "--resume",
                                       str(init))))
    np.testing.assert_allclose(losses(tmp_path / "jax"), losses(tmp_path / "torch"), rtol=1e-5)
    pj, pt = final_params(tmp_path / "jax"), final_params(tmp_path / "torch")
    for name in pj:
        tol = 1e-5 * np.abs(pt[name]).max()
        off = int((np.abs(pj[name] - pt[name]) > tol).sum())
        # AdamW: every element within 1e-5 of the tensor's scale. Lion moves each weight by
        # +-lr * sign(b1 m + (1 - b1) g): where that argument is float32 noise around zero (seen
        # for a handful of embedding entries) the two frameworks may step opposite ways, so a
        # vanishing fraction (<= 1e-5 of the elements) may differ by such a step.
        allowed = 0 if optimizer == "adamw" else max(1, int(1e-5 * pt[name].size))
        assert off <= allowed, f"{optimizer}: {off} elements of {name} differ by more than {tol:.1e}"


def test_document_masking_is_the_same_step_in_both(shards, tmp_path):
    """--doc_mask: both trainers hand the loader's documents to the model (the same losses), and
    it changes what is computed (not the losses of a run without it)."""
    init = initial_state(tmp_path, "adamw")
    for name, train, extra in (("jax", jax_train.train, ["--doc_mask"]),
                               ("torch", torch_train.train, ["--doc_mask"]),
                               ("plain", jax_train.train, [])):
        train(parse_args(flags(shards, tmp_path / name, 4, "adamw", "--resume", str(init),
                               *extra)))
    np.testing.assert_allclose(losses(tmp_path / "jax"), losses(tmp_path / "torch"), rtol=1e-5)
    assert np.abs(losses(tmp_path / "jax") - losses(tmp_path / "plain")).max() > 1e-3


@pytest.mark.parametrize("first, extra", [("jax", ()), ("torch", ("--doc_mask",))])
def test_switch_framework_mid_run(shards, tmp_path, first, extra):
    """20 steps in one framework, 20 in the other == 40 in the first (from PyTorch with packed
    documents kept apart)."""
    run = {"jax": jax_train.train, "torch": torch_train.train}
    other = "torch" if first == "jax" else "jax"
    init = initial_state(tmp_path, "adamw")
    run[first](parse_args(flags(shards, tmp_path / "straight", 40, "adamw", "--resume",
                                str(init), *extra)))
    half = tmp_path / "half"
    _run_until(run[first], flags(shards, half, 40, "adamw", "--resume", str(init), *extra), first,
               20)
    if first == "jax":
        state = jax_train.export_train_state(half, tmp_path / "state")
    else:
        state = torch_train.export_train_state(sorted((half / "checkpoints").iterdir())[-1],
                                               tmp_path / "state")
    assert load_train_state(state)[3]["step"] == 20
    run[other](parse_args(flags(shards, tmp_path / "moved", 40, "adamw", "--resume", str(state),
                                *extra)))
    moved = losses(tmp_path / "moved")
    np.testing.assert_allclose(moved, losses(tmp_path / "straight")[20:], rtol=1e-5)


def _run_until(train_fn, argv, framework, stop_step):
    """Run ``train`` with a stop request (the preemption path: save, then exit) at ``stop_step``,
    so the first half keeps the schedule of the whole run (it depends on max_iters)."""
    module = {"jax": jax_train, "torch": torch_train}[framework]

    class StopAt:  # both trainers poll a single process's flag once per step
        polls = 0

        @property
        def should_stop(self):
            self.polls += 1
            return self.polls >= stop_step

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    original = module.StopSignal
    module.StopSignal = StopAt
    try:
        train_fn(parse_args(argv))
    finally:
        module.StopSignal = original
