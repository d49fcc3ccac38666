"""`moa-train` / `python -m moa_train`: compose the config with Hydra, validate it, train."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
import hydra.core.utils
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from moa_train.cli import (
    discard_refused,
    eval_only_overrides,
    free_space,
    hold_run_folder,
    precheck,
)
from moa_train.config import ConfigError
from moa_train.errors import error_line, fail
from moa_train.io import WriteError, atomic_write_text, write_error
from moa_train.paths import config_dir
from moa_train.plugins import PluginError
from moa_train.registration import ensure_registered
from moa_train.train import distributed, eval_run


def run(cfg) -> float:
    """Hydra task function; returns the task's best-checkpoint metric (val/loss: what sweeps
    minimise).

    A user-caused error (a file of the run folder that cannot be written included: a full disk) ends
    a single run with one line and exit code 2; a run stopped by trainer.max_bad_steps with exit
    code 3. In a multirun every failure of a job, expected or not, is written to its folder's
    error.txt and logged, and the sweep goes on (the summary at the end reports it and exits
    non-zero), unless that cannot be written either: then the sweep stops with one line, exit code
    2. SIGTERM or SIGINT stops the whole command after the checkpoint, with exit code 128 + the
    signal number (143, 130)."""
    from moa_train.data import DataError
    from moa_train.sweep import record_failure
    from moa_train.train.checkpoint import CheckpointError
    from moa_train.train.guard import DivergedError
    from moa_train.train.loop import train
    from moa_train.train.preemption import Preempted
    from moa_train.train.tasks import task_class, validate

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    world = distributed.from_env().world
    if multirun and world > 1:
        fail("torchrun runs one training job; run sweeps (-m, hparams_search) without torchrun")
    try:
        validate(cfg, world)
        return train(cfg, run_dir, list(hydra_cfg.overrides.task)).get(
            task_class(cfg.task.name).best_metric
        )
    except Preempted as exc:
        print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)
    except (ConfigError, DataError, CheckpointError, DivergedError, WriteError) as exc:
        message = free_space(exc, run_dir, multirun) if isinstance(exc, WriteError) else str(exc)
        if not multirun:
            fail(message, 3 if isinstance(exc, DivergedError) else 2)
        failure = error_line(message)
    except Exception:  # a crashed job must not take the other jobs of a sweep with it
        if not multirun:
            raise
        failure = traceback.format_exc().strip().splitlines()[-1] + "\n\n" + traceback.format_exc()
    first = failure.splitlines()[0]
    try:
        record_failure(run_dir, failure)
        log.error("job %s failed: %s", hydra_cfg.job.num, first)
    except OSError as exc:  # a full disk: the other jobs could not write either
        written = exc if isinstance(exc, WriteError) else write_error(run_dir / "error.txt", exc)
        fail(
            f"{written}, so the multirun stops; job {hydra_cfg.job.num} failed: "
            f"{first.removeprefix('error: ')}"
        )
    # Optuna 2 (the sweeper's) refuses NaN: a failed trial is the worst value of the minimised
    # val/loss
    return float("inf")


def save_hydra_config(cfg, filename: str, output_dir: Path) -> None:
    """Hydra's writer of a job's .hydra/config.yaml, hydra.yaml and overrides.yaml
    (hydra.core.utils._save_config, which run_job calls by that name before the task starts): the
    same text, written atomically, and a full disk the same one line, exit 2, as for any other file
    of the run, where Hydra's own reports it over several lines with exit code 1 and leaves a file
    cut short. It ends a multirun: the next job's would fail too."""
    path = Path(output_dir) / filename
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, OmegaConf.to_yaml(cfg))
    except OSError as exc:
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        line = free_space(write_error(path, exc), Path(hydra_cfg.runtime.output_dir), multirun)
        fail(f"{line}; the multirun stops at job {hydra_cfg.job.num}" if multirun else line)


log = logging.getLogger("moa_train")

_hydra_main = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(
    run
)


def main() -> None:
    try:
        # before composing: the package's variants and tasks, then plugins' variants and corpora
        ensure_registered(plugins=True)
    except PluginError as exc:
        fail(exc)
    args = sys.argv[1:]
    if {"--help", "-h"} & set(args):  # our page; Hydra's stock one: --hydra-help
        from moa_train.cli import help_page

        print(help_page())
        return
    flags = {a for a in args if a.startswith("-")}
    plain = not flags  # not -m, --cfg, --help, ...
    # a run or a multirun: one-line errors before Hydra starts
    checked = flags <= {"-m", "--multirun"}
    cfg = precheck([a for a in args if a not in flags], multirun=bool(flags)) if checked else None
    d = distributed.init()  # under torchrun: the process group, before Hydra names the run folder
    if d.active:
        # one run folder for all ranks: train.yaml's hydra.run.dir takes its time stamp from
        # MOA_RUN_STAMP
        os.environ["MOA_RUN_STAMP"] = distributed.shared_run_stamp(d)
    lock = finished = eval_dir = new = None
    if plain and cfg.trainer.eval_only:  # results into RUN/eval/<date_time>/, no new run folder
        overrides, eval_dir = eval_only_overrides(args, cfg, eval_run.stamp())
        sys.argv = sys.argv[:1] + overrides
    elif plain and d.main:
        # the run folder's lock and the checks of a resume, before Hydra writes into the folder
        lock, pinned, finished, new = hold_run_folder(cfg, args)
        sys.argv = sys.argv[:1] + pinned
    # rank 0 alone writes the folder's .hydra/ and train.log; the others only warn
    if d.active and not d.main:
        sys.argv += [
            "hydra.output_subdir=null",
            "hydra/job_logging=stdout",
            "hydra.job_logging.root.level=WARNING",
        ]
    hydra.core.utils._save_config = save_hydra_config
    try:
        if plain and not cfg.trainer.eval_only and distributed.any_rank(finished is not None):
            # a finished run: nothing to train, and its folder, logs included, stays as it is
            if d.main:
                print(finished, file=sys.stderr)
            return
        _hydra_main()
    except SystemExit as stop:
        if stop.code == 2 and new is not None:  # refused: no folder of a run that never was
            discard_refused(new)
        raise
    finally:
        if lock is not None:
            lock.release()
        if eval_dir is not None and d.main:  # an evaluation that failed leaves no folder
            eval_run.discard_unfinished(eval_dir)
        distributed.shutdown()


if __name__ == "__main__":
    main()
