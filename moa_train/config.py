"""The config: its schema (moa_train.schema), the variant table (moa_train.models.variants), its
validation (moa_train.validation) and Hydra's composition of `configs/train.yaml`.

This module re-exports the public names of the three (plugins and docs import
`moa_train.config.ConfigError`, `compose_train`, `VARIANTS`, ...) and, once imported, has the
package's variants and tasks registered in Hydra's ConfigStore.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from moa_train.models.variants import (  # noqa: F401
    ATTENTION,
    PLUGIN_PRESETS,
    TABLE,
    VARIANTS,
    Variant,
    applicable,
    bench_presets,
    check_cross,
    cross_config,
    foreign_key,
    layer_params,
    owners,
    preset_variant,
    presets,
    register_variant,
    variant_config,
)
from moa_train.paths import config_dir
from moa_train.schema import (  # noqa: F401
    TASK_CONFIGS,
    AuxConfig,
    DataConfig,
    EarlyStoppingConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TaskConfig,
    TensorboardConfig,
    TrainConfig,
    TrainerConfig,
    WandbConfig,
    foreign_task_key,
    register_task_config,
    task_owners,
    variant_keys,
)
from moa_train.validation import (  # noqa: F401
    DIVISOR_TRIALS,
    DIVISORS_SHOWN,
    DURATION,
    MAX_BPE_VOCAB,
    MAX_INT,
    ConfigError,
    SizePart,
    StepSize,
    _check,
    _divisors,
    _one_of,
    _positive_or_null,
    activation_bytes,
    check,
    check_memory,
    check_run_folder,
    check_writable,
    device_memory,
    divisors,
    leaves,
    one_of,
    parse_duration,
    positive_or_null,
    validate,
)


def compose_train(overrides: list, return_hydra_config: bool = False):
    """`configs/train.yaml` composed with `overrides`, in-process (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def register_configs() -> None:
    from moa_train.sweep import register_resolvers

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_resolvers()  # ${moa.sweep_name:}, in train.yaml's hydra.sweep.dir


register_configs()

# --- the package's variants and tasks -------------------------------------------------------------
# Every composition of configs/train.yaml needs their schemas in the ConfigStore (and VARIANTS /
# TASK_CONFIGS filled): they register here.
import moa_train.models.registry  # noqa: E402
import moa_train.train.task_registry  # noqa: E402, F401
