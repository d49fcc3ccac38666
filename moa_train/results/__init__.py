"""Drivers that reproduce the papers' tables and rebuild docs/results/ from the committed run
records."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

from moa_train.paths import repo_root


def clear(runs_dir: Path, group: str, row: str, seeds=None) -> None:
    """Delete a row's earlier run folders (only those of `seeds` when given), so that a rerun's
    records do not mix with (or add to) the old ones, and a rerun with the same seeds does not
    resume (trainer.resume=auto) or reuse the old runs' evaluations. The other seeds' records stay:
    a seed can be added to a row without rerunning the rest."""
    for old in (runs_dir / group).glob(f"{row}-seed*"):
        seed = old.name.rpartition("-seed")[2]
        if old.is_dir() and seed.isdigit() and (seeds is None or int(seed) in seeds):
            shutil.rmtree(old)


def run_command(cmd: list) -> None:
    """One command in the foreground, echoed first; a failure stops the driver."""
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, cwd=repo_root(), check=True)


def single_run(overrides: list, run_dir: Path) -> list:
    """The command of one multirun job as a single `moa-train` run in the job's folder. A key given
    twice keeps its last value at its first place, as the multirun's sweeper records it in
    .hydra/overrides.yaml."""
    last = {o.partition("=")[0]: o for o in overrides}
    return [
        sys.executable,
        "-m",
        "moa_train",
        *(last[key] for key in dict.fromkeys(last)),
        f"hydra.run.dir={run_dir}",
    ]


class Job(NamedTuple):
    name: str  # how a failure is reported
    cmd: list
    log: Path  # the process's stdout + stderr; deleted when it succeeds, kept when it fails


def run_jobs(jobs: list, n: int, poll_s: float = 0.2, tail_lines: int = 20) -> list:
    """Run `jobs` (Job or (name, cmd, log) tuples) as separate processes, at most `n` at once, in
    the given order.

    Every job runs to its end whatever the others do. Returns the names of the failed jobs (empty:
    all succeeded), after printing each failure with the tail of its log. The processes share the
    machine's cores: each gets OMP_NUM_THREADS = cores / n unless the caller's environment sets
    it."""
    pending, running, failed = deque(Job(*j) for j in jobs), [], []
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, n))))
    while pending or running:
        while pending and len(running) < n:
            job = pending.popleft()
            job.log.parent.mkdir(parents=True, exist_ok=True)
            print(f"start {job.name}: {' '.join(map(str, job.cmd))} > {job.log}", flush=True)
            with open(job.log, "wb") as log:  # the child holds its own copy of the descriptor
                running.append(
                    (
                        job,
                        subprocess.Popen(
                            job.cmd, cwd=repo_root(), env=env, stdout=log, stderr=subprocess.STDOUT
                        ),
                    )
                )
        time.sleep(poll_s)
        for job, proc in [(j, p) for j, p in running if p.poll() is not None]:
            running.remove((job, proc))
            print(
                f"{'done' if proc.returncode == 0 else 'FAILED'} {job.name} (exit "
                f"{proc.returncode})",
                flush=True,
            )
            if proc.returncode == 0:
                job.log.unlink(missing_ok=True)
            else:
                failed.append(job)
    for job in failed:
        tail = job.log.read_text(errors="replace").splitlines()[-tail_lines:]
        print(
            f"\n{job.name} failed; the end of {job.log}:",
            *(f"  {line}" for line in tail),
            sep="\n",
            file=sys.stderr,
            flush=True,
        )
    return [job.name for job in failed]


def evaluate_each(summaries, out_name: str, evaluate, describe, remove=("checkpoints",)) -> None:
    """For each run folder of `summaries` (its summary.json paths) without `out_name` yet:
    `evaluate(run)`'s dict written there as JSON, `describe(run, result)` printed, then the run's
    `remove` entries (checkpoints: not run records) deleted."""
    for summary in summaries:
        run = summary.parent
        if (run / out_name).is_file():
            continue
        result = evaluate(run)
        (run / out_name).write_text(json.dumps(result, indent=1))
        print(describe(run, result), flush=True)
        for name in remove:
            path = run / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def welch(a: list, b: list) -> dict:
    """Welch's t-test of mean(a) != mean(b) (two-sided)."""
    from scipy import stats

    t, p = stats.ttest_ind(a, b, equal_var=False)
    return {"t": float(t), "p": float(p), "mean_diff": statistics.mean(a) - statistics.mean(b)}


def previous_meta(out: Path) -> dict:
    """The committed file's date and note, kept when the tables are rebuilt from the records."""
    path = out.with_suffix(".json")
    return json.loads(path.read_text()).get("meta", {}) if path.is_file() else {}


def results_meta(out: Path, tables_only: bool) -> dict:
    """The date, note and command of a results file's meta.

    A `--tables-only` rebuild keeps the committed file's (those of the run that measured the
    records); after fresh runs the date is today's and there is no note or command to keep.
    RESULTS_DATE / RESULTS_NOTE override both.
    """
    kept = previous_meta(out) if tables_only else {}
    return {
        "date": os.environ.get("RESULTS_DATE") or kept.get("date") or dt.date.today().isoformat(),
        "note": os.environ.get("RESULTS_NOTE") or kept.get("note"),
        "command": kept.get("command"),
    }
