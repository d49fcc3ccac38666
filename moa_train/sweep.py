"""Multiruns: one sweep folder per multirun, a job that fails is recorded in its folder while the
others go on, and a summary of every job is written at the end (a Hydra callback, configured in
configs/train.yaml under hydra.callbacks)."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from moa_train.tables import markdown_table

log = logging.getLogger(__name__)
# a job's figures in the sweep summary: its task's metrics (summary.json's summary_keys, written by
# the trainer from the task), then these
RUN_KEYS = ("steps", "step_ms_median")
# the task metrics of a summary.json written before it named them
OLD_SUMMARY_KEYS = ("val/loss", "val/bpc", "val/bleu", "test/loss", "test/bleu")
RECORD_KEYS = ("job", "overrides", "status", "error")
# swept, they change the whole name: the folder is `multirun`
NAME_SOURCES = ("experiment", "experiment_name")
REFERENCE = re.compile(r"\$\{([\w.]+)\}")  # ${model.name}: a plain key, not a resolver call


def swept_keys(cfg) -> set:
    """The keys (dotted keys or config groups) a multirun varies: `a,b`, range(), choice() on its
    command line (the un-swept config still holds them in hydra.overrides.task) and an Optuna
    search's params."""
    task = OverridesParser.create().parse_overrides(
        list(OmegaConf.select(cfg, "hydra.overrides.task", default=[]))
    )
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    return {o.key_or_group for o in task if o.is_sweep_override()} | set(params)


def unswept_name(cfg) -> str:
    """experiment_name without the parts the sweep varies: quickstart-${model.name} swept over
    model= gives `quickstart`; `multirun` when nothing is left or the experiment itself is swept."""
    swept = swept_keys(cfg)
    if swept & set(NAME_SOURCES):
        return "multirun"
    template = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["experiment_name"]))[
        "experiment_name"
    ]

    def varies(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in swept)

    if not any(varies(key) for key in REFERENCE.findall(template)):
        return str(cfg.experiment_name)
    kept = REFERENCE.sub(
        lambda m: "" if varies(m.group(1)) else str(OmegaConf.select(cfg, m.group(1))), template
    )
    # the separators a dropped part leaves behind: quickstart- -> quickstart
    return re.sub(r"([-_.])[-_.]+", r"\1", kept).strip("-_.") or "multirun"


def sweep_name(_root_) -> str:
    """`${moa.sweep_name:}` in hydra.sweep.dir: computed once, on the multirun's un-swept config,
    then read back by every job (Hydra copies that config's resolver cache into each job's config,
    as it does for ${now:})."""
    cache = OmegaConf.get_cache(_root_).setdefault("moa.sweep_name", {})
    if "name" not in cache:
        cache["name"] = unswept_name(_root_)
    return cache["name"]


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("moa.sweep_name", sweep_name, replace=True)


def record_failure(run_dir: Path, message: str) -> None:
    """error.txt in the job's folder: what the sweep summary reports for a failed job."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text(message.rstrip() + "\n")


MAX_TIME_STOP = "stopped at trainer.max_time; resume it"


def finished(run_dir: Path) -> bool:
    """Whether the run in `run_dir` finished: its summary.json is written and training did not stop
    at trainer.max_time (such a run writes its summary, stop_reason "max_time", and resumes on)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("stop_reason") != "max_time"
    except (OSError, ValueError):
        return False


def job_record(job_dir: Path) -> dict:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    record = {"job": job_dir.name, "overrides": overrides}
    if (job_dir / "summary.json").is_file():
        summary = json.loads((job_dir / "summary.json").read_text())
        keys = (*summary.get("summary_keys", OLD_SUMMARY_KEYS), *RUN_KEYS)
        metrics = {k: summary[k] for k in keys if k in summary}
        if summary.get("stop_reason") == "max_time":  # not finished: the sweep says so, exit 1
            return {**record, "status": "failed", "error": MAX_TIME_STOP, **metrics}
        return {**record, "status": "ok", **metrics}
    error = (
        (job_dir / "error.txt").read_text().strip().splitlines()
        if (job_dir / "error.txt").is_file()
        else []
    )
    return {
        **record,
        "status": "failed",
        "error": error[0] if error else "no summary.json (killed?)",
    }


def shared_overrides(records: list) -> list:
    """The overrides every job of a sweep of several has, in the first job's order."""
    if len(records) < 2:
        return []
    return [o for o in records[0]["overrides"] if all(o in r["overrides"] for r in records[1:])]


def markdown(records: list) -> str:
    """The jobs' table; the overrides every job shares said once above it, each row giving only the
    ones that set it apart."""
    keys = list(dict.fromkeys(k for r in records for k in r if k not in RECORD_KEYS))
    shared = shared_overrides(records)
    above = f"Overrides of every job: `{' '.join(shared)}`\n\n" if shared else ""
    rows = []
    for r in records:
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        status = r["status"] if r["status"] == "ok" else f"failed: {r['error']}"
        own = " ".join(o for o in r["overrides"] if o not in shared)
        rows.append([r["job"], own, status, *cells])
    return above + markdown_table(["job", "overrides", "status", *keys], rows)


class SweepSummary(Callback):
    """Writes sweep_summary.{jsonl,md} in the sweep folder; exits non-zero when any job failed."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted({p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")})
        if not jobs:  # jobs written elsewhere would otherwise pass as an empty, successful sweep
            print(f"error: no job folders in the sweep folder {sweep_dir}", file=sys.stderr)
            sys.exit(1)
        records = [job_record(j) for j in jobs]
        (sweep_dir / "sweep_summary.jsonl").write_text(
            "".join(
                json.dumps({**r, "overrides": " ".join(r["overrides"])}) + "\n" for r in records
            )
        )
        (sweep_dir / "sweep_summary.md").write_text(markdown(records))
        print(markdown(records), end="")
        failed = [r for r in records if r["status"] != "ok"]
        if failed:
            print(
                f"error: {len(failed)} of {len(records)} jobs failed (see "
                f"{sweep_dir / 'sweep_summary.md'})",
                file=sys.stderr,
            )
            sys.exit(1)
