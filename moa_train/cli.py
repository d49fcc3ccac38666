"""One-line errors for bad command-line overrides, checked before Hydra starts the run.

Hydra reports composition errors over several lines (with its search path), and a run folder it cannot create with
a traceback; a plain run composes the config once up front and turns such an error into one `error: ...` line naming
the key and what would be valid.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from moa_train.config import ConfigError
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
        if group == "hydra/launcher":
            return (f"{group}={name}: no such launcher; installed: {', '.join(exc.options)} "
                    f"(pip install -e '.[launchers]' adds joblib, submitit_local, submitit_slurm)")
        return f"{group}={name}: no such config; allowed: {', '.join(group_options(group))}"
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    first = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
    key = getattr(cause, "full_key", None)
    return f"{key}: {first}" if key else first


def precheck(overrides: list, multirun: bool = False):
    """Compose `train` with the user's overrides, validate it and check that the run folder can be written, before
    Hydra creates that folder; exit 2 with one line on failure. Returns the composed config (with `hydra`). A
    multirun (-m) is only composed, and None returned: its jobs may sweep the values that validation would refuse,
    and each job validates its own config."""
    from moa_train.config import check_writable, compose_train, validate
    from moa_train.train.runlock import RunLock

    user = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    # hydra/launcher=..., hydra/sweeper=...: plugins, which may not be installed
    plugins = [o for o in overrides if o.startswith("hydra/")]
    run_dir = [o for o in overrides if o.startswith("hydra.run.dir=")]
    try:
        # sweep syntax (choice(...), a,b) belongs to a sweeper (hparams_search sets the multirun mode itself)
        user = [o.input_line for o in OverridesParser.create().parse_overrides(user) if not o.is_sweep_override()]
        cfg = compose_train(user + plugins + run_dir, return_hydra_config=True)
        if multirun:
            return None
        validate(cfg)
        # unresolvable here (${hydra:...} needs a running job): Hydra reports it itself
        folder = OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=False)
        check_writable(folder or ".", "hydra.run.dir")
        if folder and not cfg.trainer.eval_only:  # before Hydra rewrites the .hydra/ of a run being trained;
            RunLock(folder).check()  # an evaluation reads only (into RUN/eval/) and takes no lock
    except (HydraException, OmegaConfBaseException, ConfigError) as exc:
        print(f"error: {describe(exc)}", file=sys.stderr)
        sys.exit(2)
    return cfg


def _quote(value: str) -> str:
    """`value` as a Hydra override value: plain where the grammar allows, else a quoted string."""
    if re.fullmatch(r"[\w./:~+@-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def eval_only_overrides(overrides: list, cfg, stamp: str) -> list:
    """The overrides of a plain `trainer.eval_only=true` run, redirected so that Hydra writes into
    RUN/eval/<stamp>/ (eval.log, .hydra/) and nowhere else: RUN is trainer.resume's run folder, or with
    trainer.resume=auto/true the hydra.run.dir given (whose checkpoint is evaluated). A hydra.run.dir given beside a
    trainer.resume=PATH is kept as the output folder. Exit 2 with one line where there is no checkpoint or the
    command line asks for another model than the run's, before any folder exists."""
    from moa_train.train.checkpoint import CheckpointError
    from moa_train.train.eval_run import prepare, run_folder

    resume = cfg.trainer.resume
    given_dir = any(o.startswith("hydra.run.dir=") for o in overrides)
    by_path = resume not in (True, "true", "auto", False, "false", None)
    target = Path(os.path.expanduser(str(resume))) if by_path else Path(str(cfg.hydra.run.dir))
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]  # the job's keys only (hydra's sweep keys resolve only in a running multirun)
    try:
        prepare(job, target, overrides)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    kept = [o for o in overrides if not (o.startswith("trainer.resume=") or
                                         (o.startswith("hydra.run.dir=") and not by_path))]
    out = [] if by_path and given_dir else [f"hydra.run.dir={_quote(str(run_folder(target) / 'eval' / stamp))}"]
    return kept + out + [f"trainer.resume={_quote(str(target.absolute()))}", "hydra.job.name=eval"]
