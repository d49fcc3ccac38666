"""One-line errors for bad command-line overrides, checked before Hydra starts the run.

Hydra reports composition errors over several lines (with its search path), and a run folder it cannot create with
a traceback; a plain run composes the config once up front and turns such an error into one `error: ...` line naming
the key and what would be valid.
"""
from __future__ import annotations

import sys

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moa_train.paths import config_dir


def group_options(group: str) -> list:
    """Every config of a group, sub-folders included (experiment=moas_table1/mha), leaving out `_` files."""
    root = config_dir() / group
    names = (p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
    return sorted(n for n in names if not any(part.startswith("_") for part in n.split("/")))


def describe(exc: Exception) -> str:
    """A one-line description of a composition error."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        if group.startswith("hydra/sweeper"):
            return f"{group}={name}: the Optuna sweeper is not installed; pip install -e '.[sweep]'"
        return f"{group}={name}: no such config; allowed: {', '.join(group_options(group))}"
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    first = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
    key = getattr(cause, "full_key", None)
    return f"{key}: {first}" if key else first


def precheck(overrides: list) -> None:
    """Compose `train` with the user's overrides, validate it and check that the run folder can be written, before
    Hydra creates that folder; exit 2 with one line on failure."""
    from moa_train.config import ConfigError, check_writable, compose_train, validate
    from moa_train.train.runlock import RunLock

    user = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    run_dir = [o for o in overrides if o.startswith("hydra.run.dir=")]
    try:
        # sweep syntax (choice(...), a,b) belongs to a sweeper (hparams_search sets the multirun mode itself)
        user = [o.input_line for o in OverridesParser.create().parse_overrides(user) if not o.is_sweep_override()]
        cfg = compose_train(user + run_dir, return_hydra_config=True)
        validate(cfg)
        # unresolvable here (${hydra:...} needs a running job): Hydra reports it itself
        folder = OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=False)
        check_writable(folder or ".", "hydra.run.dir")
        if folder:  # before Hydra rewrites the .hydra/ of a run another trainer is running
            RunLock(folder).check()
    except (HydraException, OmegaConfBaseException, ConfigError) as exc:
        print(f"error: {describe(exc)}", file=sys.stderr)
        sys.exit(2)
