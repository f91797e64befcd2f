"""Typed, validated, versioned training config (see configs/SCHEMA.md).

    from tuneonce.config import load_config, ConfigError
    cfg = load_config("training_presets/demo_sdxl_lora.yaml", overrides=["optimizer.lr=2e-3"])
"""
from tuneonce.config.introspect import describe_schema
from tuneonce.config.loading import ConfigError, dump_config, load_config, save_config, validate_dict
from tuneonce.config.schema import CONFIG_VERSION, TrainConfig, check_rules, config_warnings

__all__ = [
    "CONFIG_VERSION", "ConfigError", "TrainConfig", "check_rules", "config_warnings", "describe_schema",
    "dump_config", "load_config", "save_config", "validate_dict",
]  # fmt: skip
