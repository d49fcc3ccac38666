"""The package's registration, as one explicit call: `ensure_registered()` puts the train schema,
the package's attention variants (moa_train.models.registry) and tasks
(moa_train.train.task_registry) into their tables and Hydra's ConfigStore, and with `plugins` then
imports the modules named in MOA_PLUGINS, which register theirs after the package's (the tables'
order is registration order: moa-bench's rows follow it).

Every entry point calls it before it composes a config or reads a table: `moa-train`, moa-bench,
moa-generate, moa-report, load_run, the results drivers and `compose_train`. Calling it again does
nothing new (a plugin module is imported once).
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from moa_train.models.registry import register_package_variants
from moa_train.plugins import load_plugins
from moa_train.schema import TrainConfig
from moa_train.sweep import register_resolvers
from moa_train.train.task_registry import register_package_tasks

_registered = False


def register_train_schema() -> None:
    """`train_schema` (configs/train.yaml's typed schema) in the ConfigStore, and the resolvers
    train.yaml uses (${moa.sweep_name:} in hydra.sweep.dir)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_resolvers()


def ensure_registered(plugins: bool = False) -> list:
    """Register the package's parts (once); `plugins`: then import $MOA_PLUGINS' modules (a
    PluginError names one that cannot be found). Returns the plugin modules imported."""
    global _registered
    if not _registered:
        register_train_schema()
        register_package_variants()
        register_package_tasks()
        _registered = True
    return load_plugins() if plugins else []
