"""The ``transformers`` configuration of an SWA-MLA model: the ModelConfig fields (SPEC.md
section 1) as a ``PreTrainedConfig``, model_type ``swamla``.

This file is copied into every Hugging Face export (``swamla-convert SRC DST --to hf``) and
loaded from there with ``trust_remote_code=True``; it imports the ``swamla`` package for the
config's validation, so the checks and the field list stay those of ``swamla.config``.
"""

from __future__ import annotations

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# What both exported files say when the swamla package (the model's definition) is missing; they
# import it in a try block so that transformers leaves the message to them.
SWAMLA_MISSING = ("this SWA-MLA model's code needs the swamla package with PyTorch, which holds "
                  "the model definition: `pip install 'swamla[torch]'` (or `pip install -e "
                  "'.[torch]'` in the SWA-MLA repository)")

try:
    from swamla.config import ConfigError, ModelConfig
except ImportError as e:
    raise ImportError(f"{SWAMLA_MISSING} ({e})") from e

GPT2_EOS_ID = 50256  # GPT-2's <|endoftext|>, the document separator the trainers insert


@strict
class SWAMLAConfig(PreTrainedConfig):
    """SPEC.md section 1's fields with their defaults; :meth:`to_model_config` validates them
    (``swamla.config.ModelConfig``) and is what the model is built from."""

    model_type = "swamla"
    attribute_map = {"hidden_size": "n_embd", "num_attention_heads": "n_head",
                     "num_hidden_layers": "n_layer", "max_position_embeddings": "block_size"}

    n_layer: int = 12
    n_head: int = 16
    n_embd: int = 1024
    vocab_size: int = 50304
    block_size: int = 2048
    ratio_kv: int = 1
    bias: bool = False
    dropout: float | int = 0.0
    use_dyt: bool = False
    dyt_alpha_init: float | int = 0.5
    norm_eps: float = 1e-6
    swa_layers_per_cycle: int = 2
    mla_layers_per_cycle: int = 1
    swa_window: int = 256
    swa_sink_size: int = 4
    rope_theta: float | int = 10000.0
    rope_scaling: dict | None = None
    q_lora_rank: int = 0
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_norm: str = "layernorm"
    mlp_hidden_dim: int | None = None
    label_smoothing: float | int = 0.0
    init_std: float = 0.02
    logit_scale_base: float | int | None = None
    logit_scale_window: int = 2048
    logit_scale_offset: int = 0
    logit_scale_min: float | int = 1.0
    logit_scale_max: float | int = 4.0
    apply_logit_scale_during_training: bool = False
    # transformers' own fields
    use_cache: bool = True
    bos_token_id: int | None = GPT2_EOS_ID
    eos_token_id: int | list[int] | None = GPT2_EOS_ID
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False  # the head reads wte directly: there is no lm_head to tie

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> "SWAMLAConfig":
        """The transformers config of ``cfg`` (``kwargs``: transformers' own fields)."""
        return cls(**cfg.to_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        """The validated ``ModelConfig``; a ConfigError names a bad field."""
        return ModelConfig(**{name: getattr(self, name) for name in model_fields()})


def model_fields() -> list[str]:
    """The ModelConfig field names (SPEC.md section 1), each a field of SWAMLAConfig."""
    return [f.name for f in dataclasses.fields(ModelConfig)]


__all__ = ["ConfigError", "SWAMLAConfig", "model_fields"]
