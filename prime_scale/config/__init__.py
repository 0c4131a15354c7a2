"""Typed run configuration: the schema (prime_scale.config_schema: dataclasses whose comments document the keys),
loading and saving (``loading``: YAML files in ``prime_scale/configs/``, ``base:`` inheritance, dotted
command-line overrides) and the rules every config is checked by (``rules``). Import the public API from here:
``from prime_scale.config import Config, ConfigError, load_config``."""

from prime_scale.config.loading import (
    CONFIG_DIR,
    available_configs,
    config_from_dict,
    config_to_dict,
    load_config,
    named_yaml,
    parse_value,
    save_config,
)
from prime_scale.config.rules import validate
from prime_scale.config_schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    EngineConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    PrepConfig,
    PrimeConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    closest,
    field_types,
    key_help,
)

__all__ = [
    "CONFIG_DIR", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DiffusionConfig", "EngineConfig",
    "EvalConfig", "LogConfig", "ModelConfig", "PrepConfig", "PrimeConfig", "RunConfig", "SampleConfig", "TrainConfig",
    "available_configs", "closest", "config_from_dict", "config_to_dict", "field_types", "key_help", "load_config",
    "named_yaml", "parse_value", "save_config", "validate",
]
