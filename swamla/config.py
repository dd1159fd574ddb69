"""The SWA-MLA model configuration shared by both backends (SPEC.md section 1).

One frozen dataclass, validated once when built. Field names are exactly those of the portable
``config.json``; unknown keys are errors, never silently dropped. Presets are small JSON files under
``configs/`` (``tiny``, ``small``, ``base``, ``large``, ``xl``; ``medium`` is an alias of ``base``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path
from typing import Any, Mapping

ARCHITECTURE = "SWAMLA"
FORMAT_VERSION = 1

# configs/ at the repository root (the package is installed editable, see README).
_PRESET_DIRS = (Path(__file__).resolve().parent.parent / "configs",)
PRESET_ALIASES = {"medium": "base"}
PRESETS = ("tiny", "small", "base", "large", "xl")


class ConfigError(ValueError):
    """A configuration value or file that cannot describe a valid SWA-MLA model."""


class BlockKind(enum.Enum):
    SWA = "swa"
    MLA = "mla"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every architectural choice of an SWA-MLA model; see SPEC.md section 1 for each field."""

    n_layer: int = 12
    n_head: int = 16
    n_embd: int = 1024
    vocab_size: int = 50304
    block_size: int = 2048
    ratio_kv: int = 1
    bias: bool = False
    dropout: float = 0.0
    use_dyt: bool = False
    dyt_alpha_init: float = 0.5
    norm_eps: float = 1e-6
    swa_layers_per_cycle: int = 2
    mla_layers_per_cycle: int = 1
    swa_window: int = 256
    swa_sink_size: int = 4
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    q_lora_rank: int = 0
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_norm: str = "layernorm"
    mlp_hidden_dim: int | None = None  # None (null in config.json): 4 * n_embd, see mlp_hidden
    label_smoothing: float = 0.0
    init_std: float = 0.02
    logit_scale_base: float | None = None
    logit_scale_window: int = 2048
    logit_scale_offset: int = 0
    logit_scale_min: float = 1.0
    logit_scale_max: float = 4.0
    apply_logit_scale_during_training: bool = False

    def __post_init__(self):
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        self._validate()

    def __hash__(self):  # rope_scaling is a dict; hash the JSON form so configs can key caches
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    # ---------------------------------------------------------------- validation
    def _validate(self):
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "ratio_kv",
                     "swa_window", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "logit_scale_window"):
            require_int(self, name, minimum=1)
        for name in ("swa_sink_size", "q_lora_rank", "swa_layers_per_cycle",
                     "mla_layers_per_cycle", "logit_scale_offset"):
            require_int(self, name, minimum=0)
        if self.mlp_hidden_dim is not None:
            require_int(self, "mlp_hidden_dim", minimum=1)
        for name in ("bias", "use_dyt", "apply_logit_scale_during_training"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.swa_layers_per_cycle + self.mla_layers_per_cycle == 0:
            raise ConfigError("swa_layers_per_cycle + mla_layers_per_cycle must be >= 1: "
                              "the block cycle is empty")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.ratio_kv:
            raise ConfigError(f"n_head ({self.n_head}) must be divisible by ratio_kv "
                              f"({self.ratio_kv}) for grouped-query attention")
        if self.head_dim % 2:
            raise ConfigError(f"SWA head dim n_embd / n_head = {self.head_dim} must be even "
                              "(RoPE rotates pairs)")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even "
                              "(RoPE rotates pairs)")
        require_float(self, "dropout", lo=0.0, hi=1.0, hi_open=True)
        require_float(self, "label_smoothing", lo=0.0, hi=1.0, hi_open=True)
        require_float(self, "init_std", lo=0.0, lo_open=True)
        require_float(self, "norm_eps", lo=0.0, lo_open=True)
        require_float(self, "rope_theta", lo=1.0, lo_open=True)
        require_float(self, "dyt_alpha_init")
        if self.mla_norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"mla_norm must be 'layernorm' or 'rmsnorm', got {self.mla_norm!r}")
        if self.rope_scaling is not None:
            if set(self.rope_scaling) != {"type", "factor"} or self.rope_scaling["type"] != "linear":
                raise ConfigError('rope_scaling must be null or {"type": "linear", "factor": f}, '
                                  f"got {self.rope_scaling!r}")
            factor = self.rope_scaling["factor"]
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise ConfigError(f"rope_scaling.factor must be a positive number, got {factor!r}")
        if self.logit_scale_base is not None:
            require_float(self, "logit_scale_base", lo=1.0, lo_open=True)
            require_float(self, "logit_scale_min", lo=0.0, lo_open=True)
            require_float(self, "logit_scale_max", lo=0.0, lo_open=True)
            if self.logit_scale_min > self.logit_scale_max:
                raise ConfigError(f"logit_scale_min ({self.logit_scale_min}) must be <= "
                                  f"logit_scale_max ({self.logit_scale_max})")

    # ---------------------------------------------------------------- derived values
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden width: ``mlp_hidden_dim``, or 4 * n_embd when unset (so it follows an
        overridden n_embd)."""
        return self.mlp_hidden_dim if self.mlp_hidden_dim is not None else 4 * self.n_embd

    @property
    def n_head_kv(self) -> int:
        return self.n_head // self.ratio_kv

    @property
    def cycle(self) -> tuple[BlockKind, ...]:
        """One repeat of the block pattern (SPEC section 2)."""
        return ((BlockKind.SWA,) * self.swa_layers_per_cycle
                + (BlockKind.MLA,) * self.mla_layers_per_cycle)

    @property
    def block_kinds(self) -> tuple[BlockKind, ...]:
        """Kind of layer i: SWA iff i mod (S + M) < S."""
        cycle = self.cycle
        return tuple(cycle[i % len(cycle)] for i in range(self.n_layer))

    @property
    def n_cycles(self) -> int:
        """Number of whole cycle repeats (the scanned part); the rest of the layers are unrolled."""
        return self.n_layer // len(self.cycle)

    @property
    def rope_factor(self) -> float:
        return float(self.rope_scaling["factor"]) if self.rope_scaling else 1.0

    @property
    def mla_qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    # ---------------------------------------------------------------- (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_dict(self) -> dict[str, Any]:
        """The portable ``config.json`` content (SPEC section 7)."""
        return {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, **self.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "ModelConfig":
        """A config from its fields; absent ones take their defaults, unless ``data`` carries
        ``format_version``: then it is a saved config (``to_json_dict`` writes every field) and
        a missing field is an error, as its default may compute another function."""
        data = dict(data)
        arch = data.pop("architecture", ARCHITECTURE)
        if arch != ARCHITECTURE:
            raise ConfigError(f"{source}: architecture is {arch!r}, expected {ARCHITECTURE!r}")
        saved = "format_version" in data
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {version!r} is not supported "
                              f"(this code reads version {FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {unknown}; "
                              f"valid fields are {sorted(known)}")
        missing = sorted(known - set(data)) if saved else []
        if missing:
            raise ConfigError(f"{source}: saved config lacks field(s) {missing}: a saved config "
                              "holds every field, and a default may not be what the model was "
                              "trained with. Export the checkpoint again, or restore them from "
                              "the run's train_config.json (its model section)")
        return cls(**data)

    def replace(self, **overrides) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields are {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def load_saved(cls, path: str | Path) -> "ModelConfig":
        """A checkpoint's config.json (written by ``save``): it must carry ``architecture``,
        ``format_version`` (SPEC section 7) and so every field."""
        data = read_json(path)
        missing = [k for k in ("architecture", "format_version") if k not in data]
        if missing:
            raise ConfigError(f"{path}: lacks {missing}, which every checkpoint's config.json "
                              "holds (SPEC section 7); was it written by hand or another tool?")
        return cls.from_dict(data, source=str(path))


def read_json(path: str | Path) -> dict:
    """A JSON object from a config file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def require_int(cfg, name, minimum):
    """Field ``name`` of ``cfg`` must be an int >= minimum (not a bool)."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def require_float(cfg, name, lo=None, hi=None, lo_open=False, hi_open=False):
    """Field ``name`` of ``cfg`` must be a finite number within the given bounds."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ConfigError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")


def preset_path(name: str) -> Path:
    name = PRESET_ALIASES.get(name, name)
    for d in _PRESET_DIRS:
        p = d / f"{name}.json"
        if p.is_file():
            return p
    raise ConfigError(f"unknown preset {name!r}; choose one of {list(PRESETS)} "
                      f"(or 'medium', an alias of 'base'), or pass a config file path")


def load_preset(name: str, **overrides) -> ModelConfig:
    """A preset from ``configs/`` with fields overridden by name."""
    cfg = ModelConfig.load(preset_path(name))
    return cfg.replace(**overrides) if overrides else cfg


def resolve_config(spec: "str | Path | ModelConfig | Mapping", **overrides) -> ModelConfig:
    """A config from a preset name, a JSON file (or checkpoint directory), a dict or a config."""
    if isinstance(spec, ModelConfig):
        cfg = spec
    elif isinstance(spec, Mapping):
        cfg = ModelConfig.from_dict(spec)
    elif isinstance(spec, (str, Path)) and (Path(spec).suffix == ".json" or Path(spec).is_dir()):
        cfg = ModelConfig.load(spec)
    elif isinstance(spec, str):
        cfg = load_preset(spec)
    else:
        raise ConfigError(f"cannot build a config from {spec!r}")
    return cfg.replace(**overrides) if overrides else cfg


def check_token_ids(idx, vocab_size: int) -> None:
    """Raise if any token id lies outside [0, vocab_size) (JAX gathers would clamp silently)."""
    _check_ids(idx, vocab_size, "token ids", None)


def check_target_ids(targets, vocab_size: int, ignore_index: int = -100) -> None:
    """Raise if a target other than ``ignore_index`` lies outside [0, vocab_size): the loss's
    gather would give NaN (JAX, too large), another class's log-probability (JAX, negative) or
    an index error (PyTorch; on CUDA a device assert)."""
    _check_ids(targets, vocab_size, "targets", ignore_index)


def _check_ids(ids, vocab_size: int, what: str, ignore_index: int | None) -> None:
    import numpy as np

    arr = np.asarray(ids)
    if ignore_index is not None:
        arr = arr[arr != ignore_index]
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        allowed = "" if ignore_index is None else f" or be {ignore_index} (no loss)"
        raise ValueError(f"{what} must lie in [0, {vocab_size}) (vocab_size){allowed}, got min "
                         f"{lo} max {hi}: the data was tokenized for a different vocabulary")


def check_input_shapes(idx_shape, targets_shape, block_size: int, segments_shape=None) -> None:
    """Raise unless token ids are (B, T) with B, T >= 1 and T <= block_size, and targets (if
    any) have the same shape: both backends would otherwise fail deep inside with a message that
    names neither (a reshape, a broadcast, a modulo by zero) or silently broadcast."""
    idx_shape = tuple(idx_shape)
    if len(idx_shape) != 2:
        raise ValueError(f"token ids must be a (batch, time) array, got shape {idx_shape}; add "
                         "a batch axis for one sequence (idx[None])")
    B, T = idx_shape
    if B == 0 or T == 0:
        raise ValueError(f"token ids of shape {idx_shape} are empty: give at least one sequence "
                         "of at least one token")
    if T > block_size:
        raise ValueError(f"sequence length {T} exceeds block_size {block_size}; "
                         "shorten the input or build the model with a larger block_size")
    if targets_shape is not None and tuple(targets_shape) != idx_shape:
        raise ValueError(f"targets of shape {tuple(targets_shape)} do not match the token ids' "
                         f"{idx_shape}: give one target per input position (the next token, or "
                         "-100 for no loss)")
    if segments_shape is not None and tuple(segments_shape) != idx_shape:
        raise ValueError(f"segment_ids of shape {tuple(segments_shape)} do not match the token "
                         f"ids' {idx_shape}: give one document id per input position")
