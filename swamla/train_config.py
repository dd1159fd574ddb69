"""The training configuration shared by the JAX and PyTorch trainers, and its command line.

``TrainConfig`` is one frozen dataclass holding the model (``ModelConfig``), the data pipeline
(``swamla.data.DataConfig``) and the training fields, validated once when built. The command line
is generated from those three dataclasses: every field is a flag by its own name
(``--FIELD`` for training fields, ``--model.FIELD`` / ``--data.FIELD`` for the others, and a flat
``--FIELD`` when the name is unambiguous), plus the small ``ORIGINAL_FLAG_ALIASES`` table that
keeps the original project's flag names working. Precedence: defaults < ``--config FILE.json`` < flags.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import importlib
import json
import math
import os
import re
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from swamla.config import (ConfigError, ModelConfig, preset_path, read_json,
                           require_float, require_int)
from swamla.layout import count_params
from swamla.plan import ATTENTION_IMPLS, COMPUTE_DTYPES, MLP_IMPLS, REMAT_POLICIES

DEFAULT_SIZE = "small"
OPTIMIZERS = ("adamw", "lion")
# A Hub model repo id as the Hub accepts it: owner/name, each part starting and ending with a
# letter or digit, the name at most 96 characters (and neither "--" nor ".." anywhere).
HUB_REPO_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/"
                         r"(?=.{1,96}$)[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?", re.ASCII)
# The original project's flag names that are not a field's own name (or that must keep pointing at
# the model even if DataConfig grows a field of the same name).
ORIGINAL_FLAG_ALIASES = {
    "block_size": "model.block_size",
    "dropout": "model.dropout",
    "swa_layers_per_cycle": "model.swa_layers_per_cycle",
    "mla_layers_per_cycle": "model.mla_layers_per_cycle",
    "swa_window": "model.swa_window",
    "swa_sink_size": "model.swa_sink_size",
    "mla_q_lora_rank": "model.q_lora_rank",
    "mla_kv_lora_rank": "model.kv_lora_rank",
    "mla_qk_nope_head_dim": "model.qk_nope_head_dim",
    "mla_qk_rope_head_dim": "model.qk_rope_head_dim",
    "mla_v_head_dim": "model.v_head_dim",
    "tokenizer_name": "data.tokenizer_name",
    "num_workers": "data.num_workers",
}


def data_config_class() -> type:
    """``swamla.data.DataConfig``, imported on first use so importing this module stays light."""
    return importlib.import_module("swamla.data").DataConfig


def _f(default, group: str, help: str, **kw):
    """A training field: its default, its group in --help and docs/flags.md, and a one-line help."""
    return dataclasses.field(default=default, metadata={"group": group, "help": help}, **kw)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; see docs/flags.md for each field."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: load_model(DEFAULT_SIZE))
    data: Any = dataclasses.field(default_factory=lambda: data_config_class()())
    # ---- batch and length of training
    batch_size: int = _f(8, "batch", "micro-batch per device (PyTorch: per rank); global batch = "
                         "batch_size * data-parallel devices * gradient_accumulation_steps")
    gradient_accumulation_steps: int = _f(1, "batch", "micro-batches summed per optimizer step")
    max_iters: int = _f(100000, "batch", "training steps of the run (skipped non-finite steps "
                        "count)")
    doc_mask: bool = _f(False, "batch", "keep the documents packed into a row apart: attention, "
                        "RoPE positions and sinks per document, no loss across a boundary "
                        "(SPEC.md 3.3)")
    # ---- optimizer and schedule
    optimizer_type: str = _f("adamw", "optim", "adamw or lion")
    learning_rate: float = _f(1e-4, "optim", "peak learning rate, reached after warmup_iters")
    min_lr: float = _f(1e-5, "optim", "learning rate at and after max_iters (cosine floor)")
    warmup_iters: int = _f(400, "optim", "linear warmup steps from 0 to learning_rate")
    weight_decay: float = _f(0.1, "optim", "decoupled weight decay on matrices (not norms, "
                             "biases, embedding)")
    beta1: float = _f(0.9, "optim", "first-moment decay (AdamW and Lion)")
    beta2: float = _f(0.95, "optim", "second-moment decay (AdamW; Lion's update interpolation)")
    grad_clip: float = _f(1.0, "optim", "global gradient-norm clip; 0 disables (keep 1.0 for "
                          "SWA-MLA)")
    bf16_moments: bool = _f(False, "optim", "keep optimizer moments in bfloat16 (the original "
                            "project's FP8AdamW/FP8Lion); master weights stay float32")
    max_bad_steps: int = _f(10, "optim", "consecutive non-finite steps (skipped) before the run "
                            "stops")
    # ---- precision, memory, compilation
    compute_dtype: str = _f("bfloat16", "precision", "activation/matmul dtype: bfloat16 or float32")
    use_fp8: bool = _f(False, "precision", "FP8 matmuls (H100/H200); needs compute_dtype "
                       "bfloat16")
    gradient_checkpointing: bool = _f(False, "precision", "recompute activations in the "
                                      "backward pass (saves memory, ~20% slower)")
    remat_policy: str | None = _f(None, "precision", "JAX remat policy: " + ", ".join(
        REMAT_POLICIES) + "; unset: full if gradient_checkpointing else none")
    compile: bool = _f(False, "precision", "torch.compile the model (PyTorch)")
    scan_layers: bool = _f(False, "precision", "JAX: run the repeated block cycles as one "
                           "scanned loop (compile time flat in depth, but ~15% slower steps on "
                           "H100); false unrolls it (same parameters)")
    attention_impl: str = _f("auto", "precision", "attention kernel: auto (flash kernels on GPU "
                             "in 16-bit, else reference), reference, or the backend's fast one "
                             "(cudnn in JAX, flex in PyTorch)")
    fuse_projections: bool = _f(True, "precision", "JAX: run projections that share an input "
                                "(SWA q/k/v, MLA query + kv down-projection) as one GEMM (same "
                                "parameters); off under tensor parallelism")
    mlp_impl: str = _f("auto", "precision", "JAX: SwiGLU backward kernel: auto (one Pallas "
                       "kernel on GPU in 16-bit without FP8, else XLA's), xla, or pallas")
    loss_chunk: int = _f(512, "precision", "cross entropy over chunks of this many positions so "
                         "float32 logits never exist for the whole batch; 0 disables")
    # ---- parallelism
    fsdp: bool = _f(False, "parallel", "shard parameters and optimizer state with FSDP2 "
                    "(PyTorch; otherwise DDP)")
    require_gpu: bool = _f(False, "parallel", "refuse to start without a GPU (otherwise a run "
                           "that finds none trains on the CPU, with a warning)")
    mesh_data: int = _f(1, "parallel", "JAX mesh 'data' axis size (replicated params); -1 fills "
                        "with the remaining devices")
    mesh_fsdp: int = _f(-1, "parallel", "JAX mesh 'fsdp' axis size (batch and params sharded); "
                        "-1 fills with the remaining devices")
    mesh_tensor: int = _f(1, "parallel", "JAX mesh 'tensor' axis size (heads/MLP sharded); -1 "
                          "fills with the remaining devices")
    coordinator_address: str | None = _f(None, "parallel", "multi-host JAX: host:port of process "
                                         "0 (unset: auto-detect or single host)")
    num_processes: int | None = _f(None, "parallel", "multi-host JAX: number of processes")
    process_id: int | None = _f(None, "parallel", "multi-host JAX: this process's index")
    # ---- evaluation, checkpoints, logging
    output_dir: str = _f("out", "io", "checkpoints, train_config.json, metrics.jsonl, plots")
    resume: str = _f("auto", "io", "auto (latest checkpoint in output_dir if any), none, or a "
                     "training state to start from in an output_dir that holds no checkpoints "
                     "yet: a PyTorch checkpoint, a JAX run's export-jax, or an earlier PyTorch "
                     "run's output_dir (its newest checkpoint)")
    eval_interval: int = _f(1000, "io", "steps between validation evaluations")
    eval_iters: int = _f(20, "io", "validation batches per evaluation")
    save_interval: int = _f(1000, "io", "steps between checkpoints")
    keep_checkpoints: int = _f(3, "io", "newest checkpoints kept in output_dir; 0 keeps all")
    export_portable: bool = _f(True, "io", "export a portable checkpoint (SPEC section 7) at the "
                               "end")
    export_hf: bool = _f(False, "io", "also write a transformers export (docs/hf.md) to "
                         "output_dir/export_hf at the end")
    push_to_hub: str | None = _f(None, "io", "push the transformers export to this Hub repo id "
                                 "at the end (needs huggingface_hub and a login); implies "
                                 "export_hf")
    log_interval: int = _f(10, "io", "steps between metric log lines")
    progress_bar: bool = _f(True, "io", "tqdm progress bar on the main process")
    tensorboard: bool = _f(False, "io", "also log to TensorBoard in output_dir/tb (needs "
                           "tensorboardX)")
    wandb_project: str | None = _f(None, "io", "log to this Weights & Biases project (needs "
                                   "wandb)")
    wandb_run_name: str | None = _f(None, "io", "W&B run name")
    seed: int = _f(1337, "io", "seed of parameter init and data order")

    def __post_init__(self):
        if self.remat_policy is None:
            object.__setattr__(self, "remat_policy",
                               "full" if self.gradient_checkpointing else "none")
        self._validate()

    # ---------------------------------------------------------------- validation
    def _validate(self):
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"model must be a ModelConfig, got {type(self.model).__name__}")
        data_cls = data_config_class()
        if not isinstance(self.data, data_cls):
            raise ConfigError(f"data must be a swamla.data.DataConfig, got "
                              f"{type(self.data).__name__}")
        for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "max_bad_steps",
                     "eval_interval", "eval_iters", "save_interval", "log_interval"):
            require_int(self, name, 1)
        for name in ("warmup_iters", "keep_checkpoints", "seed"):
            require_int(self, name, 0)
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            require_float(self, name, lo=0.0, lo_open=(name == "learning_rate"))
        for name in ("beta1", "beta2"):
            require_float(self, name, lo=0.0, hi=1.0)
            if getattr(self, name) == 1.0:
                raise ConfigError(f"{name} must be < 1, got 1.0")
        for name in ("bf16_moments", "use_fp8", "gradient_checkpointing", "compile", "fsdp",
                     "require_gpu", "scan_layers", "fuse_projections", "export_portable",
                     "export_hf", "progress_bar", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must be <= learning_rate "
                              f"({self.learning_rate})")
        _choice(self, "optimizer_type", OPTIMIZERS)
        _choice(self, "compute_dtype", COMPUTE_DTYPES)
        _choice(self, "remat_policy", REMAT_POLICIES)
        _choice(self, "attention_impl", ATTENTION_IMPLS)
        _choice(self, "mlp_impl", MLP_IMPLS)
        if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, int) \
                or self.loss_chunk < 0:
            raise ConfigError(f"loss_chunk must be an integer >= 0, got {self.loss_chunk!r}")
        if self.gradient_checkpointing != (self.remat_policy != "none"):
            raise ConfigError(f"remat_policy {self.remat_policy!r} contradicts "
                              f"gradient_checkpointing={self.gradient_checkpointing}: a policy "
                              "other than 'none' needs gradient_checkpointing=true")
        if self.use_fp8 and self.compute_dtype != "bfloat16":
            raise ConfigError("use_fp8 needs compute_dtype 'bfloat16', got "
                              f"{self.compute_dtype!r}")
        for name in ("output_dir", "resume"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must be a non-empty string, got "
                                  f"{getattr(self, name)!r}")
        for name in ("wandb_project", "wandb_run_name", "coordinator_address"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must be a non-empty string or null, got {value!r}")
        if self.push_to_hub is not None and (not isinstance(self.push_to_hub, str)
                                             or not HUB_REPO_ID.fullmatch(self.push_to_hub)
                                             or ".." in self.push_to_hub
                                             or "--" in self.push_to_hub):
            raise ConfigError(f"push_to_hub must be a Hub repo id 'owner/name' (letters, digits, "
                              f"'-', '_', '.'), got {self.push_to_hub!r}")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ConfigError(f"coordinator_address must be host:port, got "
                              f"{self.coordinator_address!r}")
        axes = ("mesh_data", "mesh_fsdp", "mesh_tensor")
        for name in axes:
            require_int(self, name, -1)
            if getattr(self, name) == 0:
                raise ConfigError(f"{name} must be >= 1, or -1 to fill the remaining devices; "
                                  "got 0")
        if sum(getattr(self, a) == -1 for a in axes) > 1:
            raise ConfigError(f"at most one of {', '.join(axes)} may be -1")
        if self.num_processes is not None:
            require_int(self, "num_processes", 1)
        if self.process_id is not None:
            require_int(self, "process_id", 0)
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise ConfigError(f"process_id ({self.process_id}) must be < num_processes "
                                  f"({self.num_processes})")

    # ---------------------------------------------------------------- derived values
    def global_batch_size(self, data_parallel_size: int) -> int:
        """Sequences per optimizer step over all data-parallel devices."""
        return self.batch_size * data_parallel_size * self.gradient_accumulation_steps

    def tokens_per_step(self, data_parallel_size: int) -> int:
        return self.global_batch_size(data_parallel_size) * self.model.block_size

    def mesh_shape(self, n_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) axis sizes for n_devices, the -1 axis filled with the rest."""
        sizes = [self.mesh_data, self.mesh_fsdp, self.mesh_tensor]
        fixed = math.prod(s for s in sizes if s != -1)
        if n_devices % fixed or (-1 not in sizes and fixed != n_devices):
            raise ConfigError(f"mesh_data * mesh_fsdp * mesh_tensor = {sizes} does not fit "
                              f"{n_devices} devices")
        return tuple(n_devices // fixed if s == -1 else s for s in sizes)

    # ---------------------------------------------------------------- (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: {"model": {...}, "data": {...}, **training fields}."""
        out = {"model": self.model.to_dict(), "data": dataclasses.asdict(self.data)}
        out.update((f.name, getattr(self, f.name)) for f in train_fields())
        return json.loads(json.dumps(out))  # tuples -> lists, as in the saved file

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "train config") -> "TrainConfig":
        """Build from a dict shaped like ``to_dict()``; it may also name ``"size"`` (a preset, a
        model config.json or a checkpoint directory) whose fields ``"model"`` then overrides."""
        data = dict(data)
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        data_fields = {f.name for f in dataclasses.fields(data_config_class())}
        known = {"size", "model", "data"} | {f.name for f in train_fields()}
        for key in sorted(set(data) - known):
            where = ("; it is a model field: put it under \"model\"" if key in model_fields else
                     "; it is a data field: put it under \"data\"" if key in data_fields else
                     f"; valid keys are {sorted(known)}")
            raise ConfigError(f"{source}: unknown key {key!r}{where}")
        for key in ("model", "data"):
            if not isinstance(data.get(key, {}), Mapping):
                raise ConfigError(f"{source}: {key!r} must be an object of fields, got "
                                  f"{data[key]!r}")
        model = load_model(data.pop("size", DEFAULT_SIZE), data.pop("model", {}), source=source)
        return cls(model=model, data=build_data_config(data.pop("data", {}), source=source),
                   **data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def save_to_run(self, output_dir: str | Path) -> Path:
        """``output_dir/train_config.json``, with ``resume`` written as auto: launching the saved
        config again (after a preemption, or to extend the run) continues from the run's own
        checkpoints, never from the checkpoint or training state it started from."""
        path = Path(output_dir) / RUN_CONFIG_NAME
        dataclasses.replace(self, resume="auto").save(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_json(path), source=str(path))

    def replace(self, **overrides) -> "TrainConfig":
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown train config field(s) {unknown}")
        return dataclasses.replace(self, **overrides)

    def describe(self, data_parallel_size: int | None = None) -> str:
        """Multi-line summary for the log; fields differing from their default are marked *."""
        ref = {"model": ModelConfig().to_dict(), "data": dataclasses.asdict(data_config_class()())}
        ref.update((f.name, f.default) for f in train_fields())
        lines = [f"model: {count_params(self.model) / 1e6:.1f}M parameters, "
                 f"{self.model.n_layer} layers ({self.model.swa_layers_per_cycle} SWA + "
                 f"{self.model.mla_layers_per_cycle} MLA per cycle)"]
        if data_parallel_size is not None:
            lines.append(f"batch: {self.global_batch_size(data_parallel_size)} sequences = "
                         f"{self.tokens_per_step(data_parallel_size):,} tokens per step "
                         f"over {data_parallel_size} data-parallel device(s)")
        for section in ("model", "data"):
            sub = dataclasses.asdict(getattr(self, section))
            lines.append(f"{section}: " + ", ".join(
                f"{k}={v!r}" + ("*" if ref[section].get(k) != v else "") for k, v in sub.items()))
        lines.append("train: " + ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" + ("*" if ref[f.name] != getattr(self, f.name)
                                                    else "") for f in train_fields()))
        return "\n".join(lines)


class TrainingError(RuntimeError):
    """A run cannot go on (e.g. too many non-finite steps in a row); its checkpoints are kept."""


# The errors of a write that more space would have let through.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Where a library reports the OS error of a failed write in its text: Python's OSError, Rust's
# io::Error (safetensors), tensorstore's status (Orbax).
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|os error (\d+)|os_error_code='?(\d+)")


def _errno_of(error: BaseException) -> int | None:
    """The OS error number behind ``error`` or its causes, when one is known."""
    while error is not None:
        if isinstance(getattr(error, "errno", None), int):
            return error.errno
        found = _ERRNO_IN_TEXT.search(str(error))
        if found:
            return int(next(g for g in found.groups() if g))
        error = error.__cause__ or error.__context__
    return None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _tree_bytes(path: Any) -> int | None:
    """The bytes of the files under ``path`` (a last good checkpoint), None if there is none."""
    if path is None or not Path(path).exists():
        return None
    path = Path(path)
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file())


def write_failure(error: BaseException, where: str | Path, needed_bytes: int | None) -> str:
    """Why a write under ``where`` failed, in one line: the OS's reason, and for a full disk the
    space the write needs (when known) and the space free there."""
    number = _errno_of(error)
    if number is None:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        reason = lines[0] if len(lines[0]) <= 300 else "..." + lines[0][-300:]
        reason = f"{type(error).__name__}: {reason}"
        if not _torch_write_failed(error):
            return reason
        reason += " (torch.save could not write a file: a full disk or a file-size limit)"
    else:
        reason = f"{os.strerror(number)} (errno {number})"
        if number not in DISK_FULL_ERRNOS:
            return reason
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = f"it needs about {_size(needed_bytes)}, " if needed_bytes else ""
    return f"{reason}: {need}{_size(free)} free there"


def _torch_write_failed(error: BaseException) -> bool:
    """torch.save's zip writer reports a write the OS refused (a full disk) without the errno."""
    text = str(error)
    return "unexpected pos" in text or "PytorchStreamWriter failed writing" in text


def _fix(error: BaseException) -> str:
    full = _errno_of(error) in DISK_FULL_ERRNOS or _torch_write_failed(error)
    return "free space (or point --output_dir elsewhere)" if full else "fix that"


def save_failed(step: int | None, error: BaseException, last_good: Any, *,
                directory: str | Path, needed_bytes: int | None = None) -> TrainingError:
    """The error of a checkpoint that could not be written into ``directory`` (a full disk):
    both trainers write into a temporary that only a complete save replaces, so ``last_good`` is
    intact. ``needed_bytes`` defaults to the size of ``last_good``."""
    needed = needed_bytes or _tree_bytes(last_good)
    return TrainingError(f"could not save the checkpoint of step {step} in {directory}: "
                         f"{write_failure(error, directory, needed)}. The last good checkpoint, "
                         f"{last_good or 'none'}, is intact: {_fix(error)} and resume with "
                         "--resume auto")


@contextlib.contextmanager
def end_of_run_write(what: str, path: str | Path, cfg: "TrainConfig", checkpoint: Any, *,
                     needed_bytes: int | None = None) -> Iterator[None]:
    """Report a write after the last checkpoint (the loss plot, the exports) that fails on an
    OSError (a full disk) as one TrainingError line: the trained weights are safe in
    ``checkpoint`` (or the run's checkpoints when None), and launching the run again writes
    only what is missing."""
    try:
        yield
    except OSError as e:
        kept = checkpoint or Path(cfg.output_dir) / "checkpoints"
        again = ("launch the run again: it resumes at its last step, trains nothing and writes "
                 "the end-of-run files")
        fix = (f"free space, then {again} (or write the export elsewhere: swamla-convert "
               f"{cfg.output_dir} DST --to portable)" if _errno_of(e) in DISK_FULL_ERRNOS
               else f"fix that, then {again}")
        raise TrainingError(f"could not write the {what} {path}: "
                            f"{write_failure(e, path, needed_bytes)}. The trained weights are "
                            f"safe in {kept}: {fix}") from e


# -------------------------------------------------------------------- resuming
RUN_CONFIG_NAME = "train_config.json"
# What a run writes in its output_dir besides train_config.json: a folder that holds any of them
# but no train_config.json is not a run's, and a run there would write over them.
RUN_OUTPUTS = ("metrics.jsonl", "loss.png", "checkpoints", "export", "export_hf", "tb",
               "wandb_run_id")


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse, before any training, an output_dir that a run cannot use: a file, a path under a
    file, one this process may not write, or a folder of someone else's files a run would write
    over (see RUN_OUTPUTS). A run's own folder (train_config.json) is resumed."""
    out = Path(output_dir)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == out else f"lies under {probe}, which is a file"
        raise ConfigError(f"output_dir {out} {where}: choose another --output_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out} cannot be written ({probe} is not writable by this "
                          "user): choose another --output_dir or fix its permissions")
    if probe == out and not (out / RUN_CONFIG_NAME).is_file():
        theirs = [name for name in RUN_OUTPUTS if (out / name).exists()]
        if theirs:
            raise ConfigError(f"output_dir {out} holds {', '.join(theirs)} but no "
                              f"{RUN_CONFIG_NAME}: it is not a training run's, and this run would "
                              "write over them; choose another --output_dir or move them out")
# Model fields a resumed run may change: regularization, context length (RoPE extends, no weight
# depends on it) and initialization, which a resume does not run. Every other field changes the
# function the checkpoint's weights compute.
RESUMABLE_MODEL_FIELDS = ("dropout", "label_smoothing", "block_size", "init_std", "dyt_alpha_init")


def check_resume_target(resume: str, latest: Any, output_dir: str | Path) -> None:
    """Refuse a run that would train over the checkpoints ``output_dir`` already holds (``latest``
    names the newest, None if none): with resume=none it would start over on top of them, with
    an explicit path it would import over them (relaunching a run that began with ``--resume
    STATE`` would silently rewind it to STATE)."""
    if latest is None or resume == "auto":
        return
    if resume == "none":
        raise ConfigError(f"resume=none but {output_dir} already holds checkpoints (latest: "
                          f"{latest}): use --resume auto to continue that run, or another "
                          "--output_dir to start a new one")
    if Path(output_dir).absolute() in Path(resume).absolute().parents:
        raise ConfigError(f"resume={resume!r} is one of this run's own checkpoints (latest: "
                          f"{latest}): to go back to it, move the newer checkpoints out of "
                          f"{Path(resume).parent} (mv them into another directory) and use "
                          "--resume auto")
    raise ConfigError(f"resume={resume!r} but {output_dir} already holds checkpoints (latest: "
                      f"{latest}): use --resume auto to continue that run, or another "
                      "--output_dir to start from the given checkpoint")


def check_resumed_model(saved: ModelConfig, current: ModelConfig, where: str) -> None:
    """Refuse to resume weights into a model that computes another function: every model field
    but ``RESUMABLE_MODEL_FIELDS`` must match the checkpoint's (same shapes are not enough: a
    different swa_window or rope_theta loads fine and trains something else)."""
    old, new = saved.to_dict(), current.to_dict()
    differ = [k for k in old if k not in RESUMABLE_MODEL_FIELDS and old[k] != new.get(k)]
    if differ:
        raise ConfigError(
            f"{where} was trained with another model: " + ", ".join(
                f"{k}={old[k]!r} there, {new.get(k)!r} in this run" for k in differ)
            + f". Resume with the checkpoint's model (drop those flags, or --config its "
            f"{RUN_CONFIG_NAME}), or start a new run in another --output_dir")


def resume_source(resume: str, accepts=None) -> Path:
    """The saved state an explicit ``--resume PATH`` starts from, the same for both trainers:
    PATH when it is one, else the newest one in an earlier run's output_dir or its checkpoints/
    folder. ``accepts(path)`` says what a trainer resumes from: a training state (a PyTorch
    run's final checkpoint, export-jax's or export-torch's output) by default; the PyTorch
    trainer also takes its sharded checkpoints. What it cannot take gets the export that makes a
    training state of it: JAX's Orbax checkpoints, and for JAX a sharded PyTorch checkpoint."""
    from swamla.portable import is_sharded_torch_checkpoint
    from swamla.train_state import is_train_state  # safetensors: only when resuming

    accepts = accepts or is_train_state
    path = Path(resume)
    if accepts(path):
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    children = sorted(folder.iterdir()) if folder.is_dir() else []
    states = [p for p in children if not p.name.startswith(".") and accepts(p)]
    if states:  # step_00000004 (PyTorch) and any name ending in its step: the newest step
        return max(states, key=_step_of)
    sharded = [p for p in [path] + children if is_sharded_torch_checkpoint(p)]
    if sharded:
        newest = max(sharded, key=_step_of)
        raise ConfigError(
            f"resume={resume!r} is a sharded PyTorch checkpoint, which only the PyTorch trainer "
            f"reads: make a training state of it with python -m swamla.train_state export-torch "
            f"{newest} STATE, then --resume STATE")
    run = _jax_run_of(path)
    if run is not None:
        raise ConfigError(
            f"resume={resume!r} is a JAX run's Orbax checkpoint, not a training state: export one "
            f"with python -m swamla.train_state export-jax {run} STATE, then --resume STATE (to "
            f"continue that run itself, launch it with --output_dir {run} --resume auto)")
    raise ConfigError(f"resume={resume!r} is neither a training state (a directory with "
                      "trainer_state.json: a PyTorch run's final checkpoint or the output of "
                      "python -m swamla.train_state export-jax / export-torch), a PyTorch "
                      "checkpoint, nor a run's output_dir holding such checkpoints")


def _step_of(path: Path) -> int:
    """The step a checkpoint directory's name ends in (``step_00000004``, ``4``), else -1."""
    return int((re.findall(r"\d+", path.name) or ["-1"])[-1])


def _jax_run_of(path: Path) -> Path | None:
    """The JAX run whose Orbax checkpoints ``path`` names (its output_dir, its checkpoints/
    folder or one step of it: digit-named folders holding ``state``), else None."""
    runs = [path] + [p.parent for p in (path, path.parent) if p.name == "checkpoints"]
    for run in runs:
        folder = run / "checkpoints"
        if folder.is_dir() and any(c.name.isdigit() and (c / "state").is_dir()
                                   for c in folder.iterdir()):
            return run
    return None


def check_resumed_state(cfg: TrainConfig, where: str, *, model: ModelConfig, optimizer_type: str,
                        step: int, params: Mapping[str, Any] | None = None,
                        bf16_moments: bool | None = None) -> None:
    """Every check both trainers make before continuing from a saved state (their own checkpoint
    or a portable training state at ``where``), before any weight is loaded or the run directory
    is touched: the model (``check_resumed_model``), the saved tensors against this run's model
    when given, the optimizer whose moments were saved, a step within ``max_iters``, and, when
    the run continues its own checkpoints, the ``bf16_moments`` it was saved with (a new run
    started from a training state may change it; None skips the check)."""
    check_resumed_model(model, cfg.model, where)
    if params is not None:
        from swamla.portable import check_tensors  # safetensors and numpy: only when resuming

        check_tensors(dict(params), cfg.model, f"{where} (resumed with this run's model config)")
    if optimizer_type != cfg.optimizer_type:
        raise ConfigError(f"{where} holds {optimizer_type} moments but optimizer_type is "
                          f"{cfg.optimizer_type!r}; resume with --optimizer_type {optimizer_type}")
    if bf16_moments is not None and bf16_moments != cfg.bf16_moments:
        raise ConfigError(
            f"{where} holds the optimizer state of bf16_moments={bf16_moments!r}, this run has "
            f"{cfg.bf16_moments!r}. Resume with --bf16_moments {str(bf16_moments).lower()}, or "
            "change it in a new --output_dir started from this state with --resume STATE (a "
            "JAX run writes STATE with python -m swamla.train_state export-jax RUN_DIR STATE)")
    if step > cfg.max_iters:
        raise ConfigError(f"{where} is at step {step}, past max_iters {cfg.max_iters}: resume "
                          f"with --max_iters {step} or more")


# -------------------------------------------------------------------- building the parts
def train_fields() -> tuple[dataclasses.Field, ...]:
    """TrainConfig's own fields (all but model and data)."""
    return tuple(f for f in dataclasses.fields(TrainConfig) if f.name not in ("model", "data"))


def load_model(size: str, overrides: Mapping[str, Any] = (), *, source: str = "model"
               ) -> ModelConfig:
    """The model named by ``size`` (preset name, config.json or checkpoint dir) with ``overrides``.

    Overrides are applied to the raw preset fields before the config is built, so derived defaults
    (``mlp_hidden_dim`` = 4 * n_embd) follow an overridden ``n_embd``.
    """
    if not isinstance(size, str):
        raise ConfigError(f"{source}: size must be a preset name or a config path, got {size!r}")
    path = Path(size)
    if path.suffix == ".json" or path.is_dir():
        base = read_json(path / "config.json" if path.is_dir() else path)
    else:
        base = read_json(preset_path(size))
    return ModelConfig.from_dict({**base, **dict(overrides)}, source=f"{source}: model")


def build_data_config(fields: Mapping[str, Any], *, source: str = "data"):
    """A DataConfig from a dict of its fields (JSON lists become tuples where the field is one)."""
    cls = data_config_class()
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown data field(s) {unknown}; valid fields are "
                          f"{sorted(known)}")
    missing = sorted(n for n, f in known.items() if n not in fields and f.init and
                     f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{source}: data field(s) {missing} have no default and must be given")
    kwargs = {k: _listify(v, hints.get(k)) for k, v in fields.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # DataConfig's own validation error (swamla.data.DataError)
        raise ConfigError(f"{source}: data: {e}") from e


def _listify(value, tp):
    """JSON has no tuples: turn a list into one where the field's type is a tuple."""
    inner = _unwrap(tp)[0]
    if isinstance(value, list) and (typing.get_origin(inner) or inner) is tuple:
        return tuple(value)
    return value


def _unwrap(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of an annotation like ``int | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), len(args) < len(typing.get_args(tp))
    return tp, False


def _choice(cfg, name, choices):
    if getattr(cfg, name) not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {getattr(cfg, name)!r}")


# -------------------------------------------------------------------- command line
def flag_table() -> dict[str, tuple[str, ...]]:
    """Destination ('FIELD', 'model.FIELD', 'data.FIELD' or 'size') -> its flag names."""
    train = [f.name for f in train_fields()]
    subs = {"model": [f.name for f in dataclasses.fields(ModelConfig)],
            "data": [f.name for f in dataclasses.fields(data_config_class())]}
    table = {"size": ("size",), **{n: (n,) for n in train}}
    for section, names in subs.items():
        other = subs["data" if section == "model" else "model"]
        for n in names:
            flat = n not in train and n not in other and n not in ORIGINAL_FLAG_ALIASES
            table[f"{section}.{n}"] = (f"{section}.{n}",) + ((n,) if flat else ())
    for alias, dest in ORIGINAL_FLAG_ALIASES.items():
        if dest not in table:  # an original flag must keep a home; DataConfig lost the field
            raise ConfigError(f"original flag --{alias} maps to {dest}, which does not exist")
        table[dest] += (alias,)
    return table


def _dest_info(dest: str) -> tuple[Any, Any, str, str]:
    """(type, default, help, group) of a flag destination."""
    if dest == "size":
        return str, DEFAULT_SIZE, ("model preset (tiny, small, base, large, xl; medium = base), "
                                   "or a model config.json / checkpoint directory"), "model"
    section, _, name = dest.rpartition(".")
    cls = {"": TrainConfig, "model": ModelConfig, "data": data_config_class()}[section]
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else (
        "(required)" if f.default_factory is dataclasses.MISSING else f.default_factory())
    help = f.metadata.get("help", f"{cls.__name__}.{name}")
    return typing.get_type_hints(cls)[name], default, help, f.metadata.get("group", section)


GROUP_TITLES = {"model": "Model (ModelConfig, SPEC.md section 1; defaults of --size small)",
                "data": "Data (swamla.data.DataConfig)",
                "batch": "Batch and run length", "optim": "Optimizer and schedule",
                "precision": "Precision, memory, compilation", "parallel": "Parallelism",
                "io": "Evaluation, checkpoints, logging"}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser generated from TrainConfig, ModelConfig and DataConfig."""
    parser = argparse.ArgumentParser(
        description="Train an SWA-MLA model. Precedence: defaults < --config FILE.json < flags. "
        "Booleans take --flag, --no-flag or --flag true|false.",
        usage="%(prog)s [--config FILE.json] [--FLAG VALUE ...]",
        allow_abbrev=False, exit_on_error=False)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.json",
                        help="JSON file {\"size\": ..., \"model\": {...}, \"data\": {...}, "
                        "training fields...}; flags override it")
    groups = {}
    for dest, names in flag_table().items():
        tp, default, help, group = _dest_info(dest)
        if group not in groups:
            groups[group] = parser.add_argument_group(GROUP_TITLES.get(group, group))
        inner, optional = _unwrap(tp)
        base = typing.get_origin(inner) or inner
        kw = dict(dest=dest, default=argparse.SUPPRESS,  # argparse %-formats help strings
                  help=f"{help} (default: {default})".replace("%", "%%"))
        flags = ["--" + n for n in names]
        if base is bool:
            groups[group].add_argument(*flags, nargs="?", const=True, metavar="true|false",
                                       type=_converter(bool, optional), **kw)
            groups[group].add_argument(*["--no-" + n for n in names], dest=dest, const=False,
                                       action="store_const", default=argparse.SUPPRESS,
                                       help=argparse.SUPPRESS)
        elif base is tuple:
            item = (typing.get_args(inner) or (str,))[0]
            groups[group].add_argument(*flags, nargs="*", type=_converter(item, False),
                                       metavar=_METAVARS.get(item, "VALUE"), **kw)
        else:
            metavar = _METAVARS.get(base, "VALUE") + ("|none" if optional else "")
            groups[group].add_argument(*flags, type=_converter(base, optional), metavar=metavar,
                                       **kw)
    return parser


_METAVARS = {int: "INT", float: "FLOAT", str: "STR", dict: "JSON"}


def _underscored(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--train-paths`` read as ``--train_paths`` (and ``--no-progress-bar`` as
    ``--no-progress_bar``): fields are spelled with underscores, but the hyphenated spelling of
    other CLIs (``swamla.data.prepare``'s among them) is accepted wherever it names a flag."""
    options = {o for a in parser._actions for o in a.option_strings}
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and flag not in options:
            prefix = "--no-" if flag.startswith("--no-") else "--"
            fixed = prefix + flag[len(prefix):].replace("-", "_")
            if fixed in options:
                arg = fixed + eq + value
        out.append(arg)
    return out


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """TrainConfig from command-line flags (sys.argv[1:] when argv is None).

    Raises ConfigError for an unknown flag, a value of the wrong type, or an invalid config.
    ``--size`` given on the command line replaces the config file's ``size`` and ``model``.
    """
    parser = build_parser()
    argv = _underscored(parser, sys.argv[1:] if argv is None else list(argv))
    try:
        ns, extras = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ConfigError(str(e)) from e
    if extras:
        options = [o for a in parser._actions for o in a.option_strings]
        hints = [difflib.get_close_matches(x.split("=")[0], options, n=1) for x in extras]
        raise ConfigError(f"unknown argument(s) {extras}" + "".join(
            f"; did you mean {h[0]}?" for h in hints if h) + " (see --help)")
    cli = {}
    for dest, value in vars(ns).items():
        section, _, name = dest.rpartition(".")
        (cli.setdefault(section, {}) if section else cli)[name] = value
    merged, source = {}, "command line"
    if "config" in cli:
        merged, source = read_json(cli.pop("config")), f"{ns.config} + command line"
        if "size" in cli:
            merged.pop("model", None)
        for section in ("model", "data"):
            if not isinstance(merged.get(section, {}), Mapping):
                raise ConfigError(f"{ns.config}: {section!r} must be an object of fields")
    for key, value in cli.items():
        merged[key] = {**merged.get(key, {}), **value} if key in ("model", "data") else value
    return TrainConfig.from_dict(merged, source=source)


def _converter(tp, optional: bool):
    def convert(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if tp is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        if tp is dict:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from e
            if value is not None and not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
            return value
        if tp in (int, float):
            try:
                return tp(text)
            except ValueError as e:
                kind = "an integer" if tp is int else "a number"
                raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from e
        return text
    return convert


def check_device(cfg: TrainConfig, *, backend: str, on_gpu: bool, gpu_build: bool) -> str | None:
    """Where a run is about to train, checked once at its start by both trainers: None on a GPU;
    without one, a ConfigError under ``require_gpu``, else for a CUDA build of the framework
    (which had a GPU in mind) the warning to print; None for a CPU build."""
    if on_gpu:
        return None
    found = (f"{backend} is a CUDA build but found no GPU" if gpu_build
             else f"{backend} has no GPU support installed")
    fix = ("check nvidia-smi, CUDA_VISIBLE_DEVICES and the driver" + (" (and JAX_PLATFORMS)"
           if backend == "jax" else "") if gpu_build else
           "install the CUDA build (README: quick start)")
    if cfg.require_gpu:
        raise ConfigError(f"require_gpu: {found}; {fix}")
    if not gpu_build:  # a CPU build on purpose: nothing to warn about
        return None
    return (f"{found}: training runs on the CPU, far slower than on a GPU. If a GPU was meant, "
            f"{fix}; --require_gpu makes this an error")


def flags_markdown() -> str:
    """The docs/flags.md tables documenting every flag, grouped, with defaults (generated)."""
    rows: dict[str, list[str]] = {}
    for dest, names in flag_table().items():
        tp, default, help, group = _dest_info(dest)
        flags = ", ".join(f"`--{n}`" for n in names)
        rows.setdefault(group, []).append(f"| {flags} | `{json.dumps(default)}` | {help} |")
    out = []
    for group, title in GROUP_TITLES.items():
        out += [f"### {title}", "", "| flag | default | meaning |", "|---|---|---|",
                *rows.pop(group, []), ""]
    return "\n".join(out)
