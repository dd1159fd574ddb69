"""The portable training state: weights, optimizer moments and position of a run, framework-free.

A run started in one backend continues in the other from this directory (numpy in, numpy out)::

    DIR/
      config.json + model.safetensors   # a portable checkpoint (SPEC section 7), float32
      optimizer.safetensors             # float32, PyTorch names and [out, in] layout:
                                        #   "<param>.exp_avg" (adamw, lion),
                                        #   "<param>.exp_avg_sq" (adamw only)
      trainer_state.json                # {"format": "swamla-train-state", "version": 1, "step",
                                        #  "optimizer_type", "train_config", "data_state",
                                        #  "bad_steps", "framework"}

``step`` counts iterations done and ``bad_steps`` the non-finite ones among them, which were
skipped (the trainers' ``step`` and ``skipped_steps``, ``swamla.metrics``). The moments are those
after ``step - bad_steps`` updates (optax's ``mu``/``nu``, torch's ``exp_avg``/``exp_avg_sq``), so
the next update uses bias correction ``t = step - bad_steps + 1`` and ``lr_at(step - bad_steps)``,
and the data position is that after ``step`` iterations. A backend may add files of its own (the
PyTorch trainer adds its RNG states); readers ignore files they do not know. The directory is
written atomically and replaces only another training state.

    python -m swamla.train_state info DIR
    python -m swamla.train_state export-torch CKPT_DIR OUT_DIR   # a PyTorch checkpoint -> DIR
    python -m swamla.train_state export-jax RUN_DIR OUT_DIR      # a JAX run's latest -> DIR

The exports refuse an OUT_DIR that exists and is not empty; ``--overwrite`` replaces one that is
a training state (never anything else).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from safetensors.numpy import save_file

from swamla.config import ConfigError, ModelConfig
from swamla.layout import expected_shapes
from swamla.portable import (CONFIG_NAME, REWRITE_HINT, CheckpointError, _abbrev,
                             atomic_directory, check_destination, check_tensors, load_portable,
                             open_safetensors, read_safetensors, shape_views, weight_shards,
                             write_portable, write_portable_streamed, write_safetensors_streamed)

FORMAT = "swamla-train-state"
VERSION = 1
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
FRAMEWORKS = ("torch", "jax")
MOMENT_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "lion": ("exp_avg",)}
META_KEYS = ("step", "optimizer_type", "train_config", "data_state", "bad_steps", "framework")

# Subcommands that write a training state from a backend's own checkpoint: name -> module whose
# ``export_train_state(src, dst)`` does it (imported only when the subcommand runs).
EXPORTERS = {"export-torch": "swamla_torch.train", "export-jax": "swamla_jax.train"}


class TrainStateError(CheckpointError):
    """A training-state directory (or the data given to write one) that is not valid."""


def moment_keys(optimizer_type: str) -> tuple[str, ...]:
    """The moment names each parameter has under ``optimizer_type`` ('adamw' or 'lion')."""
    if optimizer_type not in MOMENT_KEYS:
        raise TrainStateError(f"optimizer_type must be one of {list(MOMENT_KEYS)}, got "
                              f"{optimizer_type!r}")
    return MOMENT_KEYS[optimizer_type]


def is_train_state(path: str | Path) -> bool:
    """Whether ``path`` is a training-state directory (it holds trainer_state.json)."""
    return (Path(path) / STATE_NAME).is_file()


def check_meta(meta: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The trainer_state.json fields, validated (``format``/``version`` may be absent)."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise TrainStateError(f"{source}: trainer state lacks {missing}")
    extra = sorted(set(meta) - set(META_KEYS) - {"format", "version"})
    if extra:
        raise TrainStateError(f"{source}: unknown trainer state keys {extra}")
    if meta.get("format", FORMAT) != FORMAT:
        raise TrainStateError(f"{source}: format is {meta['format']!r}, expected {FORMAT!r}")
    if meta.get("version", VERSION) != VERSION:
        raise TrainStateError(f"{source}: version {meta['version']!r} is not supported (this code "
                              f"reads version {VERSION})")
    for key in ("step", "bad_steps"):
        v = meta[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TrainStateError(f"{source}: {key} must be an integer >= 0, got {v!r}")
    if meta["bad_steps"] > meta["step"]:
        raise TrainStateError(f"{source}: bad_steps ({meta['bad_steps']}) counts skipped steps "
                              f"among the step ({meta['step']}) done, so cannot exceed it")
    moment_keys(meta["optimizer_type"])
    if meta["framework"] not in FRAMEWORKS:
        raise TrainStateError(f"{source}: framework must be one of {list(FRAMEWORKS)}, got "
                              f"{meta['framework']!r}")
    if not isinstance(meta["train_config"], Mapping):
        raise TrainStateError(f"{source}: train_config must be an object (TrainConfig.to_dict())")
    if meta["data_state"] is not None and not isinstance(meta["data_state"], Mapping):
        raise TrainStateError(f"{source}: data_state must be a loader state object or null")
    out = {k: meta[k] for k in META_KEYS}
    return {"format": FORMAT, "version": VERSION, **json.loads(json.dumps(out))}


def check_moments(moments: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
                  optimizer_type: str, source: str) -> None:
    """Raise naming every missing, unexpected or mis-shaped moment."""
    expected = {f"{name}.{key}": tuple(np.shape(p)) for name, p in params.items()
                for key in moment_keys(optimizer_type)}
    missing = sorted(set(expected) - set(moments))
    extra = sorted(set(moments) - set(expected))
    wrong = [f"{k}: {tuple(np.shape(moments[k]))} != parameter {expected[k]}"
             for k in sorted(set(expected) & set(moments))
             if tuple(np.shape(moments[k])) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing moments {_abbrev(missing)}")
    if extra:
        hint = (" (exp_avg_sq belongs to adamw only)" if optimizer_type == "lion"
                and any(k.endswith(".exp_avg_sq") for k in extra) else "")
        problems.append(f"unexpected moments {_abbrev(extra)}{hint}")
    if wrong:
        problems.append(f"mis-shaped moments {_abbrev(wrong)}")
    if problems:
        raise TrainStateError(f"{source}: optimizer moments do not match the {optimizer_type} "
                              "parameters: " + "; ".join(problems))


def save_train_state(directory: str | Path, cfg: ModelConfig, params: Mapping[str, np.ndarray],
                     moments: Mapping[str, np.ndarray], meta: Mapping[str, Any], *,
                     extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write a training state into ``directory`` atomically (a temporary sibling swapped in); an
    existing ``directory`` is replaced only if it is empty or a training state.

    ``params``/``moments``: numpy arrays under the portable names (any float dtype; stored
    float32). ``meta``: the trainer_state.json fields of ``META_KEYS``. ``extra_files``: a
    backend's own files (name -> bytes) written into the same atomic directory.
    """
    meta = check_meta(meta, "the training state being saved")
    check_tensors(dict(params), cfg, "the training state being saved")
    check_moments(moments, params, meta["optimizer_type"], "the training state being saved")
    for name in extra_files or {}:
        if Path(name).name != name or name in (STATE_NAME, OPTIMIZER_NAME):
            raise TrainStateError(f"extra file name {name!r} must be a plain file name other "
                                  "than the format's own")
    with atomic_directory(directory, what="training state", is_same_kind=is_train_state) as tmp:
        write_portable(dict(params), cfg, tmp)
        save_file({k: np.asarray(v, dtype=np.float32).copy(order="C")
                   for k, v in moments.items()}, str(tmp / OPTIMIZER_NAME),
                  metadata={"format": "pt"})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        # trainer_state.json marks a complete state, so it is written last.
        (tmp / STATE_NAME).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return Path(directory)


def moment_shapes(cfg: ModelConfig, optimizer_type: str) -> dict[str, tuple[int, ...]]:
    """Every moment's name and shape (those of its parameter) under ``optimizer_type``."""
    return {f"{name}.{key}": shape for name, shape in expected_shapes(cfg).items()
            for key in moment_keys(optimizer_type)}


def write_train_state(directory: str | Path, cfg: ModelConfig, meta: Mapping[str, Any],
                      read: Callable[[str], np.ndarray], *,
                      extra_files: Mapping[str, bytes] | None = None,
                      replaces: Callable[[Path], bool] = is_train_state) -> Path:
    """``save_train_state`` one tensor at a time, for states too large to hold at once:
    ``read(name)`` returns one parameter (portable name) or moment (``<param>.<key>``) as an
    array, is called once per tensor, and its result is written before the next call. Shapes
    are checked as the tensors arrive. ``replaces`` says what an existing ``directory`` may be
    (a training state; a backend may also allow its own checkpoint of the same step).
    """
    meta = check_meta(meta, "the training state being saved")
    for name in extra_files or {}:
        if Path(name).name != name or name in (STATE_NAME, OPTIMIZER_NAME):
            raise TrainStateError(f"extra file name {name!r} must be a plain file name other "
                                  "than the format's own")
    moments = moment_shapes(cfg, meta["optimizer_type"])
    with atomic_directory(directory, what="training state", is_same_kind=replaces) as tmp:
        write_portable_streamed(expected_shapes(cfg), read, cfg, tmp)
        write_safetensors_streamed(tmp / OPTIMIZER_NAME, sorted(moments.items()), read,
                                   metadata={"format": "pt"})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        # trainer_state.json marks a complete state, so it is written last.
        (tmp / STATE_NAME).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return Path(directory)


def open_train_state(directory: str | Path
                     ) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, np.ndarray],
                                Callable[[str], np.ndarray], dict]:
    """(model config, params, moments, ``read(name)`` -> a param or moment as float32, meta) of
    a training state, checked as :func:`load_train_state` checks it but without reading a tensor:
    params and moments are zero-stride views of their shapes, and a rank resuming from the state
    holds one tensor at a time."""
    directory = Path(directory)
    meta = _read_meta(directory)
    try:
        cfg = ModelConfig.load_saved(directory / CONFIG_NAME)
    except (ConfigError, OSError) as e:
        raise CheckpointError(f"{directory}: {e}") from e
    if not (directory / OPTIMIZER_NAME).is_file():
        raise TrainStateError(f"{directory} has no {OPTIMIZER_NAME}")
    params, read_param = open_safetensors(weight_shards(directory), REWRITE_HINT)
    moments, read_moment = open_safetensors([directory / OPTIMIZER_NAME], "the optimizer state "
                                            "is lost with it: resume from an earlier checkpoint")
    param_views, moment_views = shape_views(params), shape_views(moments)
    check_tensors(param_views, cfg, str(directory))
    check_moments(moment_views, param_views, meta["optimizer_type"], str(directory))
    return cfg, param_views, moment_views, (
        lambda name: read_param(name) if name in params else read_moment(name)), meta


def load_train_state(directory: str | Path
                     ) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(model config, float32 params, float32 moments, meta) of a training state, all checked."""
    directory = Path(directory)
    meta = _read_meta(directory)
    cfg, params = load_portable(directory)
    if not (directory / OPTIMIZER_NAME).is_file():
        raise TrainStateError(f"{directory} has no {OPTIMIZER_NAME}")
    moments = read_safetensors(directory / OPTIMIZER_NAME, "the optimizer state is lost with it: "
                               "resume from an earlier checkpoint")
    check_moments(moments, params, meta["optimizer_type"], str(directory))
    as32 = lambda d: {k: np.asarray(v, dtype=np.float32) for k, v in d.items()}  # noqa: E731
    return cfg, as32(params), as32(moments), meta


def _read_meta(directory: Path) -> dict:
    """trainer_state.json of a training state directory, checked."""
    if not directory.is_dir():
        raise TrainStateError(f"training state {directory} does not exist")
    if not is_train_state(directory):
        raise TrainStateError(f"{directory} has no {STATE_NAME}: not a training state (a "
                              "portable checkpoint holds weights only; resume needs the "
                              "optimizer state too)")
    try:
        raw = json.loads((directory / STATE_NAME).read_text())
    except json.JSONDecodeError as e:
        raise TrainStateError(f"{directory / STATE_NAME} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise TrainStateError(f"{directory / STATE_NAME} must hold a JSON object")
    if raw.get("format") != FORMAT:
        raise TrainStateError(f"{directory / STATE_NAME}: format is {raw.get('format')!r}, "
                              f"expected {FORMAT!r}")
    return check_meta(raw, str(directory / STATE_NAME))


def describe(directory: str | Path) -> str:
    """A few lines summarizing a training state (for ``info``)."""
    cfg, params, moments, meta = load_train_state(directory)
    n = sum(int(np.prod(p.shape)) for p in params.values())
    norm = math.sqrt(sum(float(np.sum(np.square(p, dtype=np.float64))) for p in params.values()))
    return "\n".join([
        f"{directory}: {FORMAT} v{meta['version']} written by {meta['framework']}",
        f"step {meta['step']} ({meta['optimizer_type']}), bad steps {meta['bad_steps']}, "
        f"data state {'saved' if meta['data_state'] else 'none'}",
        f"model: {cfg.n_layer} layers, width {cfg.n_embd}, {n / 1e6:.2f}M parameters "
        f"(norm {norm:.4f}), {len(moments)} moment tensors"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swamla.train_state",
                                     description="Inspect or write portable training states.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="summarize a training state").add_argument("dir")
    for name, module in EXPORTERS.items():
        p = sub.add_parser(name, help=f"write a training state from a {module.split('.')[0]} "
                           "checkpoint")
        p.add_argument("src", help="the backend's checkpoint directory")
        p.add_argument("dst", help="the training-state directory to write")
        p.add_argument("--overwrite", action="store_true",
                       help="replace dst if it is a training state (never anything else)")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(describe(args.dir))
        else:
            # Before the (slow) read of src, so a wrong dst fails at once.
            check_destination(args.dst, "training state", is_train_state,
                              overwrite=args.overwrite)
            out = importlib.import_module(EXPORTERS[args.command]).export_train_state(
                args.src, args.dst)
            print(f"wrote {out}")
    except (CheckpointError, ConfigError) as e:  # bad input, reported without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a permission: the file system's, not the input's
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
