"""The package's tasks: one `(name, task class, config class)` line each in PACKAGE_TASKS,
registered by `register_package_tasks` (a plugin's module named in MOA_PLUGINS calls register_task,
with its YAML's path; the package's tasks come first)."""

from moa_train.plugins import once
from moa_train.train.mlm import MLMConfig, MLMTask
from moa_train.train.tasks import (
    LMConfig,
    LMTask,
    TranslationConfig,
    TranslationTask,
    register_task,
)

# in registration order (TASK_CONFIGS' order)
PACKAGE_TASKS = (
    ("lm", LMTask, LMConfig),
    ("translation", TranslationTask, TranslationConfig),
    ("mlm", MLMTask, MLMConfig),
)


@once
def register_package_tasks() -> None:
    """Register PACKAGE_TASKS, once (a later call does nothing)."""
    for name, task, config in PACKAGE_TASKS:
        register_task(name, task, config)
