"""Recipes: the typed schema (`schema.py`), loading and overrides (`load.py`), checks and layouts (`validate.py`).

    cfg = load_recipe("recipes/qwen_moe.yaml", ["actor.lr=1e-6"])   # RecipeConfig, validated
    layout = validate_layout(cfg, world_size=8)                      # Layout (tp, ep, etp, dp, ...)
"""

from upgrpo_megatron.config.load import (
    from_dict,
    load_recipe,
    model_config_from_dict,
    parse_override,
    read_model_config,
    resolved_yaml,
    save_resolved,
)
from upgrpo_megatron.config.schema import (
    ActorConfig,
    AlgorithmConfig,
    ConfigError,
    CorrectionConfig,
    DataConfig,
    DiagnosticsConfig,
    ModelConfig,
    ParallelConfig,
    RecipeConfig,
    RolloutConfig,
    SFTWarmupConfig,
    TrainerConfig,
    get_key,
    to_dict,
)
from upgrpo_megatron.config.validate import (
    Layout,
    check_model_divides,
    choices,
    validate,
    validate_for_cpu_engine,
    validate_layout,
)

__all__ = [
    "ActorConfig", "AlgorithmConfig", "ConfigError", "CorrectionConfig", "DataConfig", "DiagnosticsConfig", "Layout",
    "ModelConfig", "ParallelConfig", "RecipeConfig", "RolloutConfig", "SFTWarmupConfig", "TrainerConfig",
    "check_model_divides",
    "choices", "from_dict", "get_key", "load_recipe", "model_config_from_dict", "parse_override", "read_model_config",
    "resolved_yaml", "save_resolved", "to_dict",
    "validate", "validate_for_cpu_engine", "validate_layout",
]
