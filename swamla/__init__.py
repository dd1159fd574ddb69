"""Framework-free core of SWA-MLA: config schema and presets, portable checkpoint names, data."""

from swamla.config import BlockKind, ConfigError, ModelConfig, load_preset, resolve_config
from swamla.layout import count_params

__all__ = ["BlockKind", "ConfigError", "ModelConfig", "count_params", "load_preset",
           "resolve_config"]
