"""The package's tasks: one `register_task(name, task class, config class)` line each (a plugin's
module named in MOA_PLUGINS calls register_task the same way, with its YAML's path)."""

from moa_train.train.mlm import MLMConfig, MLMTask
from moa_train.train.tasks import (
    LMConfig,
    LMTask,
    TranslationConfig,
    TranslationTask,
    register_task,
)

register_task("lm", LMTask, LMConfig)
register_task("translation", TranslationTask, TranslationConfig)
register_task("mlm", MLMTask, MLMConfig)
