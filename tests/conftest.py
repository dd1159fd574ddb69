"""Fixtures shared by the test modules of both backends."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def fp8_and_bf16_runs(tmp_path):
    """``run(train, *flags)``: 200 steps of a trainer's ``train`` in bf16 and again with
    ``--use_fp8``, same synthetic shards and init. Returns {"bf16"|"fp8": (first loss, mean of the
    last 20)}: the check that FP8 training tracks bf16, for either backend."""
    from swamla.data.synthetic import write_synthetic_shards
    from swamla.metrics import read_metrics
    from swamla.train_config import parse_args

    def run(train, *flags):
        shards = write_synthetic_shards(tmp_path / "shards", n_docs=3000, alphabet=2000)
        losses = {}
        for name, extra in (("bf16", []), ("fp8", ["--use_fp8"])):
            out = tmp_path / name
            train(parse_args([
                "--size", "tiny", "--n_embd", "256", "--n_head", "4", "--n_layer", "6",
                "--block_size", "512", "--swa_window", "128", "--batch_size", "8",
                "--source", "shards", "--train_paths", str(shards), "--max_iters", "200",
                "--warmup_iters", "20", "--learning_rate", "1e-3", "--log_interval", "1",
                "--eval_interval", "1000", "--no-progress_bar", "--output_dir", str(out),
                *flags, *extra]))
            curve = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
            losses[name] = (curve[0], float(np.mean(curve[-20:])))
        return losses

    return run
