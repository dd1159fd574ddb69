"""Metrics logging (JSONL, resume truncation, TensorBoard, W&B, console, plot), MFU accounting and
the preemption signal helper."""

import json
import math
import os
import signal
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from swamla.config import ConfigError, load_preset
from swamla.layout import count_params
from swamla.flops import (attention_flops_per_token, flops_per_token, mfu, mfu_with_attention,
                          peak_flops)
from swamla.metrics import (EVAL_KEYS, RESULT_KEYS, TRAIN_KEYS, MetricsLogger, ProgressBar,
                            check_logging_packages, eval_metrics, format_metrics, perplexity,
                            plot_metrics, read_metrics, run_result, train_metrics,
                            truncate_metrics)
from swamla.signals import StopSignal
from swamla.train_config import TrainConfig


def _steps(path):
    return [r["step"] for r in read_metrics(path)]


# ------------------------------------------------------------------------------ JSONL
def test_jsonl_one_object_per_line(tmp_path):
    with MetricsLogger(tmp_path, console=False) as log:
        log.log(1, {"loss": np.float32(3.5), "lr": 1e-4, "skipped_steps": 0})
        log.log(2, {"eval_loss": 3.0, "eval_perplexity": math.exp(3.0)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["loss"] == 3.5 and first["skipped_steps"] == 0
    assert isinstance(first["time"], float)
    assert json.loads(lines[1])["eval_perplexity"] == pytest.approx(math.exp(3.0))


def test_non_finite_values_are_null(tmp_path):
    with MetricsLogger(tmp_path, console=False) as log:
        log.log(1, {"loss": float("nan"), "grad_norm": float("inf")})
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["loss"] is None and record["grad_norm"] is None


def test_resume_drops_later_steps_then_appends(tmp_path):
    with MetricsLogger(tmp_path, console=False) as log:
        for step in range(1, 11):
            log.log(step, {"loss": 10.0 - step})
    with MetricsLogger(tmp_path, console=False, resume_step=5) as log:
        log.log(6, {"loss": 0.5})
        log.log(7, {"loss": 0.25})
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6, 7]
    assert read_metrics(tmp_path / "metrics.jsonl")[5]["loss"] == 0.5


def test_fresh_run_replaces_the_file(tmp_path):
    with MetricsLogger(tmp_path, console=False) as log:
        log.log(1, {"loss": 1.0})
    with MetricsLogger(tmp_path, console=False, resume_step=None) as log:
        log.log(1, {"loss": 2.0})
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2.0]


def test_torn_last_line_is_dropped_other_bad_lines_raise(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    assert truncate_metrics(path, 10) == 2
    assert _steps(path) == [1, 2]
    path.write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not valid JSON"):
        read_metrics(path)


def test_not_main_process_writes_nothing(tmp_path, capsys):
    with MetricsLogger(tmp_path / "out", is_main=False, tensorboard=True,
                       wandb_project="never-imported") as log:
        assert log.log(1, {"loss": 1.0}) is None
    assert not (tmp_path / "out").exists()
    assert capsys.readouterr().out == ""


def test_reserved_keys(tmp_path):
    with MetricsLogger(tmp_path, console=False) as log, pytest.raises(ValueError, match="'step'"):
        log.log(1, {"step": 3})


def test_record_helpers_give_the_contract_keys():
    """Both trainers build their records here: the same keys, memory in GiB, one perplexity."""
    record = train_metrics(loss=None, lr=1e-4, grad_norm=0.5, tokens_per_s=None, mfu=None,
                           peak_memory_bytes=3 * 2**30, skipped_steps=2)
    assert tuple(record) == TRAIN_KEYS and record["mem_gib"] == 3.0
    assert train_metrics(loss=1.0, lr=0.0, grad_norm=0.0, tokens_per_s=1.0, mfu=None,
                         peak_memory_bytes=None, skipped_steps=0)["mem_gib"] is None
    assert tuple(eval_metrics(2.0)) == EVAL_KEYS
    assert eval_metrics(2.0)["eval_perplexity"] == pytest.approx(math.exp(2.0))
    assert perplexity(1e4) == math.inf and math.isnan(perplexity(float("nan")))
    result = run_result(step=3, skipped_steps=1, train=record, evaluation={},
                        stopped_early=False, plot=Path("x.png"))
    assert tuple(result) == RESULT_KEYS
    assert result["skipped_steps"] == 1 and result["eval_loss"] is None
    assert result["plot"] == "x.png" and result["export"] is None


# ------------------------------------------------------------------------------ console
def test_console_line(tmp_path, capsys):
    metrics = {"loss": 3.21412, "lr": 1e-4, "grad_norm": 0.8312, "tokens_per_s": 96500.0,
               "mfu": 0.154, "mem_gib": 41.23, "skipped_steps": 0, "custom": 2.5}
    line = format_metrics(100, metrics, max_iters=1000)
    assert line == ("step 100/1000 | loss 3.2141 | lr 1.00e-04 | grad_norm 0.831 | 96.5K tok/s | "
                    "mfu 15.4% | mem 41.2 GiB | skipped 0 | custom 2.5")
    with MetricsLogger(tmp_path, max_iters=1000) as log:
        log.log(100, metrics)
    assert capsys.readouterr().out.strip() == line


def test_progress_bar_quiet_off_main(capsys):
    with ProgressBar(10, is_main=False) as bar:
        bar.update(1, {"loss": 1.0})
    with ProgressBar(10, enabled=False) as bar:
        bar.update(1)
    assert capsys.readouterr().err == ""
    with ProgressBar(10, initial=2) as bar:
        bar.update(3, {"loss": 1.5})
    err = capsys.readouterr().err
    assert "5/10" in err and "loss=1.5" in err


# ------------------------------------------------------------------------------ TensorBoard, W&B
def test_tensorboard_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes the import fail
    with pytest.raises(ConfigError, match="pip install tensorboardX"):
        MetricsLogger(tmp_path, tensorboard=True)
    with pytest.raises(ConfigError, match="pip install tensorboardX"):
        check_logging_packages(TrainConfig(tensorboard=True))


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboardX")
    with MetricsLogger(tmp_path, console=False, tensorboard=True) as log:
        log.log(1, {"loss": 2.0, "eval_loss": 2.5})
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_wandb_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        MetricsLogger(tmp_path, wandb_project="p")
    with pytest.raises(ConfigError, match="pip install wandb"):
        check_logging_packages(TrainConfig(wandb_project="p"))


def test_wandb_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, metrics, step):
            calls.append(("log", metrics, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricsLogger(tmp_path, console=False, wandb_project="p", wandb_run_name="r",
                       run_config={"lr": 1}) as log:
        log.log(3, {"loss": 1.0, "note": "text"})
    init_kwargs = calls[0][1]
    assert (init_kwargs["project"], init_kwargs["name"], init_kwargs["config"]) == ("p", "r",
                                                                                    {"lr": 1})
    assert calls[1] == ("log", {"loss": 1.0}, 3) and calls[2] == ("finish",)
    with MetricsLogger(tmp_path, console=False, wandb_project="p", resume_step=3):
        pass
    assert calls[3][1]["id"] == init_kwargs["id"] and calls[3][1]["resume"] == "allow"


# ------------------------------------------------------------------------------ plot
def test_plot_metrics_writes_a_png(tmp_path):
    with MetricsLogger(tmp_path, console=False) as log:
        for step in range(1, 51):
            log.log(step, {"loss": 5.0 / step, "lr": 1e-4 * min(1, step / 10)})
            if step % 10 == 0:
                log.log(step, {"eval_loss": 5.5 / step})
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_without_losses_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no 'loss' or 'eval_loss'"):
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "x.png")


# ------------------------------------------------------------------------------ MFU
@pytest.mark.parametrize("name,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 80GB HBM3", "fp8", 1979e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA GH200 480GB", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "fp8", None),
    ("TPU v5 lite", "bf16", 197e12),
    ("cpu", "bf16", None),
    ("Some Future Card", "bf16", None),
])
def test_peak_flops_table(name, dtype, expected):
    assert peak_flops(name, dtype) == expected


def test_peak_flops_unknown_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        peak_flops("NVIDIA H100", "int4")


def test_mfu_is_six_n_over_peak():
    assert mfu(1_000_000, 1000.0, 6e9) == pytest.approx(1.0)
    assert mfu(10, 1.0, None) is None
    with pytest.raises(ValueError, match="peak must be > 0"):
        mfu(10, 1.0, 0.0)
    # GPU.md: the small preset (262.6M true params) at 96.5K tok/s on an H100 is 15.4% MFU
    n = count_params(load_preset("small"))
    assert n == pytest.approx(262.6e6, rel=1e-3)
    assert mfu(n, 96.5e3, peak_flops("NVIDIA H100 80GB HBM3")) == pytest.approx(0.154, abs=5e-4)


def test_attention_flops():
    cfg = load_preset("tiny")  # 4 layers: SWA SWA MLA SWA; window 32, sink 4
    T, W, S = 64, cfg.swa_window, cfg.swa_sink_size
    swa_keys = np.mean([min(i + 1, W) + min(S, max(0, i + 1 - W)) for i in range(T)])
    expected = 6 * (3 * swa_keys * cfg.n_head * 2 * cfg.head_dim
                    + (T + 1) / 2 * cfg.n_head * (cfg.mla_qk_head_dim + cfg.v_head_dim))
    assert attention_flops_per_token(cfg, T) == pytest.approx(expected)
    # a window covering the whole sequence is plain causal attention
    wide = load_preset("tiny", swa_window=T)
    assert attention_flops_per_token(wide, T) == pytest.approx(
        6 * (T + 1) / 2 * cfg.n_head * (3 * 2 * cfg.head_dim + cfg.mla_qk_head_dim
                                        + cfg.v_head_dim))
    assert flops_per_token(cfg, T, attention=False) == 6 * count_params(cfg)
    assert mfu_with_attention(cfg, 100.0, 1e12, T) == pytest.approx(
        flops_per_token(cfg, T) * 100.0 / 1e12)
    assert mfu_with_attention(cfg, 100.0, 1e12, T) > mfu(count_params(cfg), 100.0, 1e12)


# ------------------------------------------------------------------------------ signals
def test_stop_signal_sets_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) != before
        assert not stop.should_stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop and stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_second_sigint_aborts():
    # The handler before may be Python's default or SIG_IGN (a shell starts background jobs
    # with SIGINT ignored); either way it comes back.
    before = signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == before


def test_import_installs_no_handler():
    import importlib

    import swamla.signals

    before = signal.getsignal(signal.SIGTERM)
    importlib.reload(swamla.signals)
    assert signal.getsignal(signal.SIGTERM) == before


def test_console_line_prints_counts_whole():
    from swamla.metrics import format_metrics

    line = format_metrics(5, {"tokens[shards/web]": 14208.0, "ratio": 0.25})
    assert "tokens[shards/web] 14,208" in line and "ratio 0.25" in line
