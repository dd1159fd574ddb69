"""Training metrics: a JSONL log (the record of a run), optional TensorBoard and W&B, a console
line, a progress bar and a loss-curve plot. Framework-free; the trainers pass Python floats (or
anything with ``__float__``: numpy scalars, 0-d jax arrays and torch tensors on the host).

``output_dir/metrics.jsonl`` holds one JSON object per line: ``step``, ``time`` (unix seconds) and
the metrics logged at that step. Non-finite values are written as ``null`` (strict JSON). A resumed
run first drops the lines with ``step > resume_step``, so the steps it repeats are not logged twice.

Both trainers log the same records, built by ``train_metrics`` and ``eval_metrics``:

- a training record every ``log_interval`` steps and at ``max_iters``, with every key of
  ``TRAIN_KEYS``: ``loss`` (mean over the steps since the previous record whose update was
  applied; null if none was), ``lr`` (the rate of the last applied update), ``grad_norm`` (the
  last step's, before clipping), ``tokens_per_s`` (over the steps since the previous record, all
  devices), ``mfu`` (``swamla.flops.mfu``; null without a known peak), ``mem_gib`` (peak device
  memory since the process started, in GiB = 2**30 bytes; null where the device does not report
  it), ``skipped_steps`` (total non-finite steps of the run, resumes included);
- an evaluation record every ``eval_interval`` steps and at ``max_iters``, with ``EVAL_KEYS``:
  ``eval_loss`` and ``eval_perplexity``.

``step`` is the number of iterations done, skipped ones included: a step whose loss or gradient
is not finite changes nothing but is counted (in ``step`` and ``skipped_steps``), so a run always
stops at ``max_iters`` iterations and the data position follows ``step``. The learning-rate
schedule and the optimizer's bias correction count applied updates, ``step - skipped_steps``:
the next update uses ``swamla.schedule.lr_at(step - skipped_steps)``. Checkpoints and training
states (``swamla.train_state``) store ``step`` and ``skipped_steps`` (as ``bad_steps``) with the
same meaning.

``train(cfg)`` of either trainer returns ``run_result(...)``: the keys of ``RESULT_KEYS``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Mapping

from tqdm import tqdm

from swamla.config import ConfigError

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
PLOT_FILE = "loss.png"  # beside metrics.jsonl, by plot_metrics at the end of a run
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gib", "skipped_steps")
EVAL_KEYS = ("eval_loss", "eval_perplexity")
RESULT_KEYS = ("step", *TRAIN_KEYS, *EVAL_KEYS, "stopped_early", "checkpoint", "export",
               "export_hf", "plot")


def perplexity(loss: float) -> float:
    """``exp(loss)``; inf where that overflows a float (logged as null), never an error."""
    try:
        return math.exp(loss)
    except OverflowError:  # loss > ~709.8: a diverged model
        return math.inf


def train_metrics(*, loss: float | None, lr: float, grad_norm: float,
                  tokens_per_s: float | None, mfu: float | None, peak_memory_bytes: int | None,
                  skipped_steps: int) -> dict[str, Any]:
    """A training record of ``TRAIN_KEYS`` (see the module docstring for each one's meaning)."""
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "mem_gib": None if peak_memory_bytes is None else peak_memory_bytes / 2**30,
            "skipped_steps": int(skipped_steps)}


def eval_metrics(loss: float) -> dict[str, float]:
    """An evaluation record of ``EVAL_KEYS``: the mean validation loss and its perplexity."""
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}


def run_result(*, step: int, skipped_steps: int, train: Mapping[str, Any],
               evaluation: Mapping[str, Any], stopped_early: bool, checkpoint=None, export=None,
               export_hf=None, plot=None) -> dict[str, Any]:
    """What ``train(cfg)`` returns, the keys of ``RESULT_KEYS``: the step reached, the last
    training and evaluation records (None for a metric not logged in this process's run), and
    the paths written (None for what was not)."""
    path = lambda p: None if p is None else str(p)  # noqa: E731
    return {"step": int(step), **{k: train.get(k) for k in TRAIN_KEYS},
            **{k: evaluation.get(k) for k in EVAL_KEYS}, "skipped_steps": int(skipped_steps),
            "stopped_early": bool(stopped_early), "checkpoint": path(checkpoint),
            "export": path(export), "export_hf": path(export_hf), "plot": path(plot)}


def skipped_step_message(step: int, loss: float, grad_norm: float, in_a_row: int,
                         total: int, max_bad_steps: int) -> str:
    """What both trainers say when a step's update is skipped."""
    return (f"step {step}: non-finite loss ({loss:.4g}) or gradient norm ({grad_norm:.4g}); its "
            f"update was skipped ({in_a_row} in a row, {total} in this run; {max_bad_steps} in a "
            "row stop the run)")


def too_many_skipped_message(in_a_row: int, max_bad_steps: int, step: int,
                             last_checkpoint) -> str:
    """The error both trainers stop with after ``max_bad_steps`` skipped steps in a row."""
    return (f"{in_a_row} consecutive non-finite steps (max_bad_steps={max_bad_steps}) at step "
            f"{step}; stopping. The last good checkpoint is kept ({last_checkpoint or 'none yet'}): "
            "lower learning_rate or check the data, then resume from it")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file; a torn last line (a run killed mid-write) is skipped."""
    lines = Path(path).read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1} is not valid JSON: {e}") from e
    return records


def truncate_metrics(path: str | Path, resume_step: int) -> int:
    """Drop the records with ``step > resume_step`` (rewriting the file atomically); returns the
    number of records kept. A missing file is left missing."""
    path = Path(path)
    if not path.exists():
        return 0
    kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return len(kept)


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


# metric -> console format, in console order; other numeric metrics follow as "name value".
_CONSOLE = {
    "loss": lambda v: f"loss {v:.4f}",
    "eval_loss": lambda v: f"eval_loss {v:.4f}",
    "eval_perplexity": lambda v: f"eval_perplexity {v:.2f}",
    "lr": lambda v: f"lr {v:.2e}",
    "grad_norm": lambda v: f"grad_norm {v:.3f}",
    "tokens_per_s": lambda v: f"{_si(v)} tok/s",
    "mfu": lambda v: f"mfu {v:.1%}",
    "mem_gib": lambda v: f"mem {v:.1f} GiB",
    "skipped_steps": lambda v: f"skipped {v}",
}


def format_metrics(step: int, metrics: Mapping[str, Any], max_iters: int | None = None) -> str:
    """One console line: ``step 100/1000 | loss 3.2141 | lr 1.00e-04 | 96.5K tok/s | ...``."""
    parts = [f"step {step}" + (f"/{max_iters}" if max_iters else "")]
    for key, fmt in _CONSOLE.items():
        if metrics.get(key) is not None:
            parts.append(fmt(metrics[key]))
    for key, value in metrics.items():
        if key not in _CONSOLE and value is not None and not isinstance(value, str):
            exact = isinstance(value, int) or float(value).is_integer()  # counts, e.g. tokens
            parts.append(f"{key} {int(value):,}" if exact else f"{key} {float(value):.4g}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes each ``log(step, metrics)`` to JSONL, and optionally to the console, TensorBoard
    (``output_dir/tb``, via tensorboardX) and Weights & Biases. Only the main process writes:
    with ``is_main=False`` every method does nothing, so trainers call it unconditionally.

    ``resume_step``: None starts a fresh ``metrics.jsonl`` (an existing one is replaced); an int
    keeps the lines with ``step <= resume_step`` and appends after them.
    """

    def __init__(self, output_dir: str | Path, *, resume_step: int | None = None,
                 is_main: bool = True, console: bool = True, max_iters: int | None = None,
                 tensorboard: bool = False, wandb_project: str | None = None,
                 wandb_run_name: str | None = None, run_config: Mapping[str, Any] | None = None):
        self.is_main, self.console, self.max_iters = is_main, console, max_iters
        self.path = Path(output_dir) / METRICS_FILE
        self._file = self._tb = self._wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses <= 1 line
        if tensorboard:
            self._tb = _tensorboard_writer(Path(output_dir) / "tb", resume_step)
        if wandb_project is not None:
            self._wandb = _wandb_run(Path(output_dir), wandb_project, wandb_run_name,
                                     run_config, resumed=resume_step is not None)

    @classmethod
    def from_config(cls, cfg, *, resume_step: int | None = None, is_main: bool = True,
                    console: bool = True) -> "MetricsLogger":
        """A logger set up from a TrainConfig's output_dir, tensorboard and wandb fields."""
        return cls(cfg.output_dir, resume_step=resume_step, is_main=is_main, console=console,
                   max_iters=cfg.max_iters, tensorboard=cfg.tensorboard,
                   wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name,
                   run_config=cfg.to_dict())

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any] | None:
        """Record ``metrics`` at ``step``; returns the JSON record (None off the main process)."""
        if not self.is_main:
            return None
        if "step" in metrics or "time" in metrics:
            raise ValueError("'step' and 'time' are written by the logger; do not pass them")
        record = {"step": int(step), "time": round(time.time(), 3),
                  **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        if self.console:
            tqdm.write(format_metrics(step, metrics, self.max_iters))
        numeric = {k: float(v) for k, v in metrics.items()
                   if v is not None and not isinstance(v, (str, bool))}
        if self._tb is not None:
            for key, value in numeric.items():
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self._tb.add_scalar(tag, value, int(step))
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_logging_packages(cfg) -> None:
    """Fail at the start of a run, not after its model is built, when a TrainConfig asks for
    TensorBoard or W&B logging without the package installed."""
    if cfg.tensorboard:
        _import_tensorboardx()
    if cfg.wandb_project is not None:
        _import_wandb(cfg.wandb_project)


def _import_tensorboardx():
    try:
        import tensorboardX
    except ImportError as e:
        raise ConfigError("tensorboard=true needs the tensorboardX package: "
                          "pip install tensorboardX (or set tensorboard=false)") from e
    return tensorboardX


def _import_wandb(project: str):
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(f"wandb_project={project!r} needs the wandb package: pip install "
                          "wandb (or leave wandb_project unset)") from e
    return wandb


def _tensorboard_writer(logdir: Path, resume_step: int | None):
    SummaryWriter = _import_tensorboardx().SummaryWriter
    # purge_step hides events after the resumed step, as the JSONL truncation does
    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(str(logdir), purge_step=purge)


def _wandb_run(output_dir: Path, project: str, name: str | None,
               run_config: Mapping[str, Any] | None, resumed: bool):
    wandb = _import_wandb(project)
    # The run id lives in output_dir so a resumed run continues the same W&B run.
    id_file = output_dir / WANDB_ID_FILE
    if resumed and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
    return wandb.init(project=project, name=name, id=run_id, resume="allow",
                      dir=str(output_dir), config=dict(run_config or {}))


class ProgressBar:
    """tqdm over optimizer steps, silent off the main process or when disabled."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True,
                 is_main: bool = True, desc: str = "train"):
        self.enabled = enabled and is_main
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                         dynamic_ncols=True, disable=not self.enabled)

    def update(self, n: int = 1, metrics: Mapping[str, Any] | None = None) -> None:
        if metrics:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                   for k, v in metrics.items() if v is not None}, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plot_metrics(jsonl_path: str | Path, png_path: str | Path) -> Path:
    """Loss curves (train and eval loss vs step) over a learning-rate panel, saved as a PNG."""
    # The object API with an Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(jsonl_path)
    series = {key: [(r["step"], r[key]) for r in records if r.get(key) is not None]
              for key in ("loss", "eval_loss", "lr")}
    if not series["loss"] and not series["eval_loss"]:
        raise ValueError(f"{jsonl_path} has no 'loss' or 'eval_loss' values to plot")
    fig = Figure(figsize=(9, 6), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        if series[key]:
            steps, values = zip(*series[key])
            ax_loss.plot(steps, values, style, label=f"{label} (last {values[-1]:.4f})",
                         markersize=3)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if series["lr"]:
        ax_lr.plot(*zip(*series["lr"]), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path
