"""`trainer.eval_only`: evaluate a run's checkpoint with the run's own config.

The model, data and every training setting come from the config stored in the checkpoint (as
`load_run` reads it), so `trainer.eval_only=true trainer.resume=RUN` needs none of the run's
training overrides repeated. What the command line may change:
- where things are on this machine (`data.root`, `data.cache_dir`, `trainer.device`): always the
  current command's, since the run may have trained elsewhere;
- how to evaluate (`eval.*`, `trainer.eval_iters`, `trainer.precision`, ...): the run's own unless
  overridden;
- the model and data: never; an override that differs from the run's is refused in one line naming
  both values.
Results go to `RUN/eval/<date_time>/` (`eval.json` and `eval.log`), so the run's own files stay as
they are.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from moa_train.models.registry import model_config
from moa_train.validation import ConfigError, leaves

log = logging.getLogger(__name__)

# locations on the evaluating machine: the current command's, whatever the run used
LOCAL_KEYS = ("data.root", "data.cache_dir", "trainer.device", "logger")
# how to evaluate: the run's own settings unless the command line overrides them
# (and the task's own: Task.eval_keys, task.beam ...)
EVAL_KEYS = (
    "trainer.eval_iters",
    "trainer.eval_batch_size",
    "trainer.precision",
    "trainer.tf32",
    "trainer.compile",
    "trainer.compile_backend",
    "trainer.compile_mode",
    "trainer.sdpa_backend",
    "data.split",
)
# what makes the model and its data: fixed by the checkpoint; a group choice (model=gqa) is compared
# by its name
FIXED_PREFIXES = ("model", "data", "task")


def run_folder(target: Path) -> Path:
    """The run folder of a checkpoint file (`RUN/checkpoints/step_*.pt`) or of a run folder."""
    if target.is_file():
        return target.parent.parent if target.parent.name == "checkpoints" else target.parent
    return target.parent if target.name == "checkpoints" else target


def _matches(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _override_keys(overrides: list) -> list:
    """The config keys (or group names) that the command-line overrides set; hydra.* left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(
        [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    )
    return [o.key_or_group for o in parsed]


def _refuse_other_model(cfg, run_cfg: dict, keys: list, eval_keys: tuple = EVAL_KEYS) -> None:
    """ConfigError when a model or data override asks for another value than the run's. Bundles of
    settings (experiment=, debug=, mode=) are not compared: the run's own model is evaluated
    whatever they hold."""
    trained = dict(leaves(run_cfg))
    for key in keys:
        if not _matches(key, FIXED_PREFIXES) or _matches(key, LOCAL_KEYS + eval_keys):
            continue
        name = f"{key}.name" if key in FIXED_PREFIXES else key  # model=gqa sets model.name
        asked = OmegaConf.select(cfg, name)
        if name in trained and asked != trained[name]:
            raise ConfigError(
                f"{name}: the run was trained with {trained[name]!r}, the command line asks for "
                f"{asked!r}; trainer.eval_only evaluates the run's own model: leave the model and "
                "data overrides out"
            )


def eval_config(cfg, run_cfg: dict, overrides: list | None = None):
    """The config to evaluate with: the run's (`run_cfg`, from its checkpoint), with the current
    command's locations and the evaluation settings that `overrides` set (None: none were given)."""
    from moa_train.train.tasks import saved_config, task_class, task_config

    run_cfg = saved_config(run_cfg)  # in the current layout, whenever it was saved
    keys = _override_keys(overrides or [])
    eval_keys = EVAL_KEYS + task_class(run_cfg["task"]["name"]).eval_keys
    _refuse_other_model(cfg, run_cfg, keys, eval_keys)
    # the schema's types, its values
    out = OmegaConf.merge(cfg, {k: v for k, v in run_cfg.items() if k not in ("model", "task")})
    # typed by the run's own variant and task, not the command line's
    out.model = model_config(run_cfg["model"])
    out.task = task_config(run_cfg["task"])
    taken = list(LOCAL_KEYS) + [k for k in keys if _matches(k, eval_keys)]
    with open_dict(out):
        for key in taken:
            OmegaConf.update(out, key, OmegaConf.select(cfg, key), merge=False)
        out.trainer.eval_only = True
        out.trainer.resume = cfg.trainer.resume
    ignored = sorted(
        {k for k in keys if not _matches(k, tuple(taken))} - {"trainer.eval_only", "trainer.resume"}
    )
    if ignored:
        log.info("eval_only: the run's own settings are used for %s", ", ".join(ignored))
    return out


def stamp() -> str:
    """The time stamp of an evaluation folder, as Hydra names run folders (torchrun: rank 0's,
    shared)."""
    import os
    import time

    return os.environ.get("MOA_RUN_STAMP") or time.strftime("%Y-%m-%d_%H-%M-%S")


@functools.lru_cache(maxsize=4)
def saved_config(target: Path) -> tuple:
    """(path, saved config) of the newest readable checkpoint under `target`: read once per process,
    although the entry point checks an evaluation before Hydra starts and the job prepares it again;
    the weights are not kept."""
    from moa_train.train.checkpoint import load_latest

    path, state, _ = load_latest(target, "cpu", key="trainer.eval_only")
    return path, state["config"]


def discard_unfinished(folder: Path) -> None:
    """Remove the evaluation folder `folder` (RUN/eval/<date_time>/) unless it holds eval.json: an
    evaluation that failed leaves no folder holding only its log (the error was printed), and
    RUN/eval/ goes too where it is then empty. Earlier evaluations' folders stay."""
    import shutil

    if (folder / "eval.json").is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: earlier evaluations
        folder.parent.rmdir()


def prepare(cfg, run_dir: Path, overrides: list | None = None) -> tuple:
    """(config, output folder) of an evaluation: the checkpoint is the newest readable one under
    trainer.resume (a path; auto/true: `run_dir`, the output then going to
    `run_dir`/eval/<date_time>/)."""
    from moa_train.train import distributed
    from moa_train.train.checkpoint import checkpoints_in
    from moa_train.train.tasks import validate

    resume = cfg.trainer.resume
    if resume in (True, "true", "auto"):
        target, out = run_dir, run_dir / "eval" / stamp()
    elif resume in (False, "false", None):
        raise ConfigError(
            "trainer.eval_only: needs trainer.resume=PATH (a checkpoint or run folder)"
        )
    else:
        target, out = Path(str(resume)).expanduser(), run_dir
    if not checkpoints_in(target):
        raise ConfigError(
            f"trainer.eval_only: no checkpoint found under {target}; set trainer.resume=PATH to a "
            "checkpoint file or run folder"
        )
    path, run_cfg = saved_config(target.resolve())
    evaluated = eval_config(cfg, run_cfg, overrides)
    evaluated.trainer.resume = str(path)  # the checkpoint just read, with no second fallback search
    validate(evaluated, distributed.from_env().world)
    log.info("eval_only: %s with the config of %s", path, run_folder(path))
    return evaluated, out
