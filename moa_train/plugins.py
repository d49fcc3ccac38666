"""Extensions that live outside the package: `MOA_PLUGINS=pkg.mod1,mod2` names modules that
`moa-train` imports at start-up, before it composes the config. Importing a plugin registers what it
adds: an attention variant by `moa_train.models.registry.register`, an LM corpus in
`moa_train.data.corpora.LM_CORPORA`; moa_train.registration.ensure_registered(plugins=True)
imports them after registering the package's own parts. Its YAML files (`data/<name>.yaml`,
`model/<name>.yaml`) come from a folder added to Hydra's search path:
`hydra.searchpath=[file:///path/to/configs]` on the command line.

This module only imports the named modules: it sits below every other layer, so any part may load
plugins.
"""

from __future__ import annotations

import functools
import importlib
import os

ENV = "MOA_PLUGINS"


class PluginError(ValueError):
    """A module named in MOA_PLUGINS that cannot be found: printed as one line by the entry
    point."""


def once(register):
    """`register()` run at its first call only: later calls, re-entrant ones included (a
    registration that registers the package's parts first), do nothing."""
    done = False

    @functools.wraps(register)
    def first_call() -> None:
        nonlocal done
        if not done:
            done = True
            register()

    return first_call


def load_plugins(spec: str | None = None) -> list:
    """Import the modules of `spec` (comma-separated; default: $MOA_PLUGINS), once each; returns
    them."""
    names = [
        n.strip()
        for n in (os.environ.get(ENV, "") if spec is None else spec).split(",")
        if n.strip()
    ]
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            # else: its own bug
            if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
                raise
            raise PluginError(
                f"{ENV}: no module named {name!r} (is its folder on PYTHONPATH?)"
            ) from None
    return modules
