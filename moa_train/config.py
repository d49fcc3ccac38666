"""The config: its schema (moa_train.schema), the variant table (moa_train.models.variants), its
validation (moa_train.validation) and Hydra's composition of `configs/train.yaml`.

This module is the facade user code and plugins import (`moa_train.config.ConfigError`,
`compose_train`, `VARIANTS`, ...): it re-exports the public names of the three and calls
moa_train.registration.ensure_registered, so its tables read full. It sits above the models and the
trainer (moa_train.models, moa_train.train and moa_train.fastpaths import the owners, never this
module).
"""

from __future__ import annotations

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
from moa_train.registration import ensure_registered
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
)
from moa_train.validation import validate as validate_common


def validate(cfg) -> None:
    """The checks common to every task (moa_train.validation.validate) against VARIANTS."""
    validate_common(cfg, VARIANTS)


def compose_train(overrides: list, return_hydra_config: bool = False):
    """`configs/train.yaml` composed with `overrides`, in-process (Hydra's compose API), the
    package's parts registered first."""
    from hydra import compose, initialize_config_dir

    ensure_registered()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


# This module is the facade user code imports (`from moa_train.config import VARIANTS`): its tables
# read full from the import on. The package's own entry points call ensure_registered themselves.
ensure_registered()
