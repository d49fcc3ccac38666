"""One metrics dict, many sinks. `MetricsLogger.log` converts device tensors to floats in one
transfer and hands the same flat dict to every sink: metrics.jsonl (always), TensorBoard and W&B
(when configured)."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from moa_train.io import atomic_write_text, write_error

log = logging.getLogger(__name__)


def to_floats(metrics: dict) -> dict:
    """Tensors -> floats with a single device-to-host copy."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if k not in keys}
    if keys:
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
        out.update(zip(keys, values, strict=True))
    return out


@contextmanager
def writing(path, errnos: tuple = ()):
    """An OSError inside (a full disk) as a WriteError naming `path`: one line, exit code 2.
    `errnos`: only OSErrors of these codes (the others are raised as they are)."""
    try:
        yield
    except OSError as exc:
        if errnos and exc.errno not in errnos:
            raise
        raise write_error(path, exc) from exc


# what a full, read-only or failing disk raises; wandb's other OSErrors (its network's among them)
# stay its own
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO)


class JsonlSink:
    """metrics.jsonl: one JSON object per line, `step` plus flat keys. A line cut short by a full
    disk is dropped when the run is resumed (truncate_jsonl)."""

    def __init__(self, path: Path):
        self.path = path
        with writing(path):
            # open for the sink's life, closed by close()
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, metrics: dict) -> None:
        with writing(self.path):
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()

    def close(self) -> None:
        # what close would flush was lost at the write that failed, which reported it
        with suppress(OSError):
            self.file.close()


def _keep(row: dict, last_step: int) -> bool:
    """Lines up to the checkpoint's step, minus end-of-run test lines (the resumed run writes its
    own)."""
    return row.get("step", 0) <= last_step and not any(k.startswith("test/") for k in row)


def _parse(line: str, number: int, path: Path) -> dict | None:
    """A line's record; None for a line cut short (a full disk or a kill while it was written)."""
    try:
        return json.loads(line)
    except ValueError:
        log.warning(
            "%s, line %d: not a complete JSON record (an interrupted write); dropped", path, number
        )
        return None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (written by a run that is being resumed from that step,
    or, with 0, by one that stopped before its first checkpoint), and any line an interrupted write
    left incomplete."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = [
        line
        for number, line in enumerate(lines, 1)
        if line.strip()
        and (row := _parse(line, number, path)) is not None
        and _keep(row, last_step)
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _quiet_event_writer(hook):
    """threading.excepthook less the traceback of TensorBoard's writer thread failing on a full
    disk: the sink's next flush raises that error in the main thread, where it becomes one line."""

    def quiet(args) -> None:
        if not (
            isinstance(args.exc_value, OSError)
            and type(args.thread).__name__ == "_AsyncWriterThread"
        ):
            hook(args)

    quiet.moa_event_writer = True
    return quiet


class TensorBoardSink:
    """Events written by TensorBoard's writer thread; each log flushes them, so a write that fails
    (a full disk) is raised by that log, as a WriteError naming the folder."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        """purge_step (a resumed run's first step): TensorBoard hides what earlier writers logged
        from that step on, so the steps re-run after a resume show once."""
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        if not getattr(threading.excepthook, "moa_event_writer", False):
            threading.excepthook = _quiet_event_writer(threading.excepthook)
        with writing(log_dir):
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, metrics: dict) -> None:
        with writing(self.log_dir):
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def log_figure(self, step: int, name: str, figure) -> None:
        with writing(self.log_dir):
            self.writer.add_figure(name, figure, step)
            self.writer.flush()

    def close(self) -> None:
        with suppress(OSError):  # a failed write is raised by the log that flushed it
            self.writer.close()


def wandb_mode(mode: str) -> str:
    """auto: online where an API key is set, else offline (the run can be uploaded later with `wandb
    sync`)."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_names(cfg, overrides: list) -> dict:
    """Dashboard names from the experiment and the job's overrides, unless set in logger.wandb."""
    w = cfg.logger.wandb
    suffix = ",".join(o for o in overrides if not o.startswith(("hydra", "logger")))
    return {
        "project": w.project,
        "entity": w.entity,
        "group": w.group or cfg.experiment_name,
        "name": w.name or (f"{cfg.experiment_name}[{suffix}]" if suffix else cfg.experiment_name),
        "tags": sorted({cfg.model.name, cfg.data.name, *w.tags}),
    }


class WandbSink:
    """The run's files go under the run folder (wandb/); a resumed run continues the same W&B run by
    its id. Everything goes to a step the run has logged: the charts and figures of the end to its
    last step (W&B puts a log without a step at the next one, a step the run never had, and drops
    one at an earlier step than it has seen). A full disk met by wandb's Python side (its folders,
    media files) is a WriteError naming RUN/wandb; what wandb-core, a process of its own, writes
    (the run's record) is left to wandb."""

    def __init__(self, cfg, run_dir: Path, config: dict, run_id: str | None, overrides: list):
        import wandb

        self.wandb = wandb
        self.dir = run_dir / "wandb"
        with writing(self.dir, DISK_ERRORS):
            self.run = wandb.init(
                **wandb_names(cfg, overrides),
                mode=wandb_mode(cfg.logger.wandb.mode),
                dir=str(run_dir),
                config=config,
                id=run_id,
                resume="allow",
            )
        self.run_id = self.run.id
        # site -> choice -> [(step, share)], for the per-layer utilisation charts
        self.util: dict = {}
        self.step = 0  # the last step logged

    def log(self, step: int, metrics: dict) -> None:
        self.step = max(self.step, step)
        with writing(self.dir, DISK_ERRORS):
            self.run.log(metrics, step=step)
        for key, value in metrics.items():
            if key.startswith("routing/util/"):
                _, _, site, choice = key.split("/", 3)
                self.util.setdefault(site, {}).setdefault(choice, []).append((step, value))

    def log_figure(self, step: int, name: str, figure) -> None:
        with writing(self.dir, DISK_ERRORS):
            self.run.log({name: self.wandb.Image(figure)}, step=max(step, self.step))

    def close(self) -> None:
        """One line chart per routed site: each choice's share over training."""
        with writing(self.dir, DISK_ERRORS):
            try:
                for site, choices in self.util.items():
                    steps = [s for s, _ in next(iter(choices.values()))]
                    chart = self.wandb.plot.line_series(
                        xs=steps,
                        ys=[[v for _, v in pts] for pts in choices.values()],
                        keys=list(choices),
                        title=f"utilisation {site}",
                        xname="step",
                    )
                    self.run.log({f"charts/utilisation/{site}": chart}, step=self.step)
            finally:  # the run is finished (its files closed) whatever failed before
                self.run.finish()
        # finish() returns before wandb's service has closed the run's file (it finishes the file
        # later, or at exit, which a launcher's worker process may skip): shutting the service down
        # waits for it
        if self.wandb.run is None:  # unless another W&B run of this process still needs it
            self.wandb.teardown()


class MetricsLogger:
    """Sends one metrics dict to every sink; figures (the final utilisation heatmap) go to every
    dashboard sink."""

    def __init__(self, sinks: list):
        self.sinks = sinks
        # (step, routing/util/* values) of the last log that had them
        self.last_util: tuple = (0, {})

    def log(self, step: int, metrics: dict) -> dict:
        values = to_floats(metrics)
        for sink in self.sinks:
            sink.log(step, values)
        util = {k: v for k, v in values.items() if k.startswith("routing/util/")}
        if util:
            self.last_util = (step, util)
        return values

    def log_utilisation_heatmap(self) -> None:
        dashboards = [s for s in self.sinks if hasattr(s, "log_figure")]
        step, util = self.last_util
        if not (dashboards and util):
            return
        import matplotlib.pyplot as plt

        from moa_train.metrics.plots import utilisation_figure

        figure = utilisation_figure(util, f"utilisation at step {step}")
        for sink in dashboards:
            sink.log_figure(step, "routing/utilisation_heatmap", figure)
        plt.close(figure)

    @property
    def wandb_id(self) -> str | None:
        return next((s.run_id for s in self.sinks if isinstance(s, WandbSink)), None)

    def close(self) -> None:
        try:
            self.log_utilisation_heatmap()
        finally:  # each sink closes its files, also after a dashboard's figure failed (full disk)
            for sink in self.sinks:
                sink.close()


def job_overrides(run_dir: Path) -> list:
    """The command-line overrides Hydra recorded for this run (none for in-process runs)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def build_logger(
    cfg,
    run_dir: Path,
    resolved_config: dict,
    wandb_id: str | None = None,
    resumed_step: int | None = None,
) -> MetricsLogger:
    """The sinks of `cfg.logger` besides metrics.jsonl; a run resumed from `resumed_step` continues
    the W&B run `wandb_id` and hides TensorBoard's points after that step."""
    sinks = [JsonlSink(run_dir / "metrics.jsonl")]
    if cfg.logger.tensorboard is not None:
        purge = None if resumed_step is None else resumed_step + 1
        sinks.append(TensorBoardSink(run_dir / cfg.logger.tensorboard.log_dir, purge))
    if cfg.logger.wandb is not None:
        sinks.append(WandbSink(cfg, run_dir, resolved_config, wandb_id, job_overrides(run_dir)))
    return MetricsLogger(sinks)
