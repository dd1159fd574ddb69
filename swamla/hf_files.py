"""Hugging Face export directories (``swamla-convert SRC DST --to hf``), read without transformers.

An export is a ``transformers`` model directory: ``config.json`` with ``model_type: "swamla"``
(the ModelConfig fields beside transformers' own), safetensors weights under the portable names
(SPEC.md section 7, sharded with an index when large), the modeling code, GPT-2 tokenizer files
and ``generation_config.json``. Its weights *are* portable tensors, so reading one back is the
portable reader with another config.json; writing one needs transformers
(``swamla_torch.hf.export``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from swamla.config import ConfigError, ModelConfig
from swamla.portable import (CONFIG_NAME, INDEX_NAME, REWRITE_HINT, WEIGHTS_NAME, CheckpointError,
                             check_tensors, read_weights)

MODEL_TYPE = "swamla"
# What an export holds besides the weights: AutoTokenizer reads these (GPT-2's BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CODE_FILES = ("configuration_swamla.py", "modeling_swamla.py")


def hf_model_type(path: str | Path) -> str | None:
    """The ``model_type`` of the Hugging Face config.json in directory ``path``, or None when
    there is none (not a directory, no config.json, or a config without model_type: a portable
    or native checkpoint's)."""
    config = Path(path) / CONFIG_NAME
    if not Path(path).is_dir() or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    return model_type if isinstance(model_type, str) else None


def is_hf_export(path: str | Path) -> bool:
    """An SWA-MLA Hugging Face export (what ``--overwrite`` may replace with another)."""
    return hf_model_type(path) == MODEL_TYPE and (
        (Path(path) / WEIGHTS_NAME).is_file() or (Path(path) / INDEX_NAME).is_file())


def load_hf_export(directory: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The config and portable tensors of an export, checked like a portable checkpoint's; a
    CheckpointError names what is wrong (another model_type, missing weights or tokenizer files,
    a tensor that does not match the config)."""
    directory = Path(directory)
    model_type = hf_model_type(directory)
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{directory} is not an SWA-MLA Hugging Face export: its config.json has model_type "
            f"{model_type!r}, expected {MODEL_TYPE!r} (only models written by "
            "`swamla-convert SRC DST --to hf` can be read back)")
    data = json.loads((directory / CONFIG_NAME).read_text())
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    missing = sorted(fields - set(data))
    if missing:
        raise CheckpointError(f"{directory / CONFIG_NAME} lacks the model field(s) {missing}, "
                              f"which every export holds: {REWRITE_HINT}")
    try:
        cfg = ModelConfig(**{k: data[k] for k in fields})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {e}") from e
    absent = [f for f in TOKENIZER_FILES if not (directory / f).is_file()]
    if absent:
        raise CheckpointError(f"{directory} lacks the tokenizer file(s) {absent}: AutoTokenizer "
                              f"could not load it. {REWRITE_HINT}")
    tensors = read_weights(directory)
    check_tensors(tensors, cfg, str(directory))
    return cfg, tensors
