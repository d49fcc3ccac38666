"""Drivers that reproduce the papers' tables and rebuild docs/results/ from the committed run
records.

What every driver guarantees (docs/reliability.md): its arguments and its moa-train overrides are
checked in-process before anything is written (`fail`: one `error: ...` line, exit 2); new run
records are built in <runs-dir>/.staging/ and replace the old ones only once the new set is
complete (`Staging`), so a failed or interrupted driver leaves the old records and tables as they
were; tables are written only from a complete set of evaluated records, each file by
temp-and-rename."""

from __future__ import annotations

import argparse
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
from typing import NamedTuple, NoReturn

from moa_train.errors import Parser, fail
from moa_train.io import atomic_write, atomic_write_text
from moa_train.paths import repo_root
from moa_train.sweep import finished

STAGING = ".staging"  # beside the records, in the runs dir: renames stay on one file system


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text) if text.strip().lstrip("+").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(text)
    return int(text)


def comma_list(allowed: tuple, parse=str, what: str = ""):
    """An argparse type: a non-empty comma list of `allowed` values (any value `parse` accepts when
    `allowed` is empty; `what` names them then), each once."""

    def parse_list(text: str) -> list:
        try:
            values = [parse(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or any(allowed and v not in allowed for v in values):
            raise argparse.ArgumentTypeError(
                f"got {text!r}; give a comma list of {what or ', '.join(map(str, allowed))}"
            )
        return list(dict.fromkeys(values))

    return parse_list


def check_overrides(runs: list, world_size: int = 1) -> None:
    """Compose and validate each override list (one per kind of run a driver starts) in-process,
    as `moa-train` does before it starts: a bad override ends the driver with moa-train's one line,
    exit 2, before anything is deleted or trained."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from moa_train.cli import describe, parse
    from moa_train.config import ConfigError, compose_train
    from moa_train.plugins import PluginError
    from moa_train.registration import ensure_registered
    from moa_train.train.tasks import validate

    try:
        ensure_registered(plugins=True)
        for overrides in runs:
            parse(overrides)
            validate(compose_train(overrides, return_hydra_config=True), world_size)
    except PluginError as exc:
        fail(str(exc))
    except (HydraException, OmegaConfBaseException, ConfigError) as exc:
        fail(describe(exc))


def check_writable(**folders) -> None:
    """Refuse (one line naming the option) a folder that cannot be written: checked before a
    driver trains, so that its records and tables have somewhere to go."""
    from moa_train.config import ConfigError
    from moa_train.config import check_writable as writable

    for option, folder in folders.items():
        try:
            writable(folder, "--" + option.replace("_", "-"))
        except ConfigError as exc:
            fail(str(exc))


def old_runs(folder: Path, row: str, seeds=None) -> list:
    """A row's run folders <row>-seed<k> in `folder` (only those of `seeds` when given)."""
    out = []
    for old in sorted(folder.glob(f"{row}-seed*")):
        k = old.name.rpartition("-seed")[2]
        if old.is_dir() and k.isdigit() and (seeds is None or int(k) in seeds):
            out.append(old)
    return out


def unfinished(names: list, staging: Path, hint: str = "") -> NoReturn:
    fail(
        f"{len(names)} run(s) failed or did not finish: {', '.join(names)}; the old records and "
        f"tables are unchanged; the new runs (with the failed ones' logs) are in {staging}{hint}",
        code=1,
    )


class Staging:
    """A driver's new run records, built in <runs_dir>/.staging/ with the runs dir's layout, beside
    the old records: they replace them only once the whole new set is complete, so a failed or
    interrupted driver leaves the old records untouched (and its new runs here, to inspect or, where
    the driver can, to resume: `resume`; otherwise a driver starts from an empty staging folder)."""

    def __init__(self, runs_dir: Path, resume: bool = False):
        self.runs_dir = runs_dir
        self.root = runs_dir / STAGING
        self.replaced = self.root / ".replaced"  # old records, until the new ones are all in place
        if self.replaced.exists():  # a commit was cut short: these may be the only copies
            fail(
                f"{self.replaced} holds old records that an interrupted driver was replacing; move "
                f"them back into {runs_dir} (or delete them), then rerun"
            )
        if not resume:
            shutil.rmtree(self.root, ignore_errors=True)

    def stop_if_failed(self, failed: list, hint: str = "") -> None:
        """Stop the driver (exit 1) when runs `failed`: the old records stay, the new runs wait
        here."""
        if failed:
            unfinished(failed, self.root, hint)

    def incomplete(self, runs: list, evaluation: str | None = None) -> list:
        """The staged `runs` (paths relative to the runs dir) without summary.json (or without
        `evaluation`)."""
        need = [evaluation] if evaluation else []
        return [
            r
            for r in runs
            if not (finished(self.root / r) and all((self.root / r / n).is_file() for n in need))
        ]

    def commit(
        self, runs: list, evaluation: str | None = None, superseded=(), hint: str = ""
    ) -> None:
        """Move the staged `runs` over the old records of the same names, and the `superseded` old
        records (those the new set replaces under other names: a row's dropped seeds) out of the
        way; then delete the staging folder. Refused (exit 1, nothing moved) unless every one of
        `runs` is complete."""
        missing = self.incomplete(runs, evaluation)
        if missing:
            unfinished(missing, self.root, hint)
        for old in dict.fromkeys([*superseded, *(self.runs_dir / r for r in runs)]):
            if old.exists():
                aside = self.replaced / old.relative_to(self.runs_dir)
                aside.parent.mkdir(parents=True, exist_ok=True)
                old.rename(aside)
        for r in runs:
            (self.runs_dir / r).parent.mkdir(parents=True, exist_ok=True)
            (self.root / r).rename(self.runs_dir / r)
        shutil.rmtree(self.root)


def staged_jobs(runs_dir: Path, names: list, job, keep_finished: bool = False) -> list:
    """`job(name, run_dir)` for each of `names`, its run folder in <runs_dir>/.staging/; with
    keep_finished, none for a run already finished there (an unfinished one resumes from its last
    checkpoint: trainer.resume=auto)."""
    runs = ((name, runs_dir / STAGING / name) for name in names)
    return [job(name, run) for name, run in runs if not (keep_finished and finished(run))]


def summaries(runs_dir: Path, pattern: str) -> list:
    """The summary.json files of `pattern` under `runs_dir`, outside hidden folders (the staging
    folder of a driver that did not finish)."""
    return sorted(
        p
        for p in runs_dir.glob(pattern)
        if not any(part.startswith(".") for part in p.relative_to(runs_dir).parts)
    )


def evaluated(summary: Path, name: str) -> Path:
    """A record's evaluation file; a record without one is refused (a table is never built from a
    partial set)."""
    path = summary.parent / name
    if not path.is_file():
        fail(
            f"{summary.parent}: a run record without {name} (its evaluation never ran); rerun its "
            "row, or remove the folder"
        )
    return path


def no_records(runs_dir: Path, what: str = "runs") -> NoReturn:
    fail(f"--runs-dir: no {what} under {runs_dir}; nothing to build the tables from")


def write_text(path: Path, text: str) -> None:
    """A table file by temp-and-rename: never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def save_figure(fig, path: Path, **kwargs) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:], **kwargs))


def run_command(cmd: list) -> int:
    """One command in the foreground, echoed first; its exit code."""
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, cwd=repo_root()).returncode


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


def training_job(name: str, overrides: list, run_dir: Path) -> Job:
    """The Job that trains `overrides` as a single moa-train run in `run_dir`, its output in
    <run_dir>.log."""
    return Job(name, single_run(overrides, run_dir), run_dir.with_suffix(".log"))


def run_jobs(jobs: list, n: int, poll_s: float = 0.2, tail_lines: int = 20) -> list:
    """Run `jobs` (Job or (name, cmd, log) tuples) as separate processes, at most `n` at once, in
    the given order.

    Every job runs to its end whatever the others do. Returns the names of the failed jobs (empty:
    all succeeded), after printing each failure with the tail of its log. The processes share the
    machine's cores: each gets OMP_NUM_THREADS = cores / n unless the caller's environment sets
    it."""
    if n < 1:  # nothing would ever start
        raise ValueError(f"run_jobs: n must be >= 1, got {n}")
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


def mean_sd(values: list, digits: int = 2) -> str:
    """`mean +- sd` over seeds; a single seed's value alone."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


class DriverParser(Parser):
    """A driver's parser with the options every driver takes: --seeds, --jobs, --runs-dir (default
    docs/results/runs/<name>), --out (docs/results/<name>) and --tables-only. The driver adds its
    own, then parses with `parse_checked`."""

    def __init__(
        self,
        doc: str,
        name: str,
        seeds: int = 3,
        seeds_help: str = "seeds 0..N-1 per row",
        jobs_help: str = "runs at once on the one device",
    ):
        super().__init__(description=doc.splitlines()[0])
        self.add_argument("--seeds", type=positive_int, default=seeds, help=seeds_help)
        self.add_argument("--jobs", type=positive_int, default=1, help=jobs_help)
        self.add_argument("--runs-dir", type=Path, default=repo_root() / "docs/results/runs" / name)
        self.add_argument("--out", type=Path, default=repo_root() / "docs/results" / name)
        self.add_argument(
            "--tables-only",
            action="store_true",
            help="rebuild the tables from the records, run nothing",
        )

    def add_choices(self, option: str, allowed: tuple) -> None:
        """`option`: a comma list of `allowed` values (default: all of them)."""
        self.add_argument(
            option,
            type=comma_list(allowed),
            default=list(allowed),
            help=f"a comma list of {', '.join(allowed)}",
        )

    def add_keep_finished(self) -> None:
        self.add_argument(
            "--keep-finished",
            action="store_true",
            help="keep the runs that an interrupted call (a time limit) finished in "
            "<runs-dir>/.staging/, resume its unfinished ones",
        )

    def parse_checked(self, argv, runs=None) -> tuple:
        """The arguments (with `overrides`, extra moa-train overrides for every run) and the
        resolved runs dir, once --out is known to be writable and, unless --tables-only, --runs-dir
        too and the override lists `runs(args)` gives (one per kind of run) valid."""
        self.add_argument("overrides", nargs="*", help="extra moa-train overrides for every run")
        args = self.parse_args(argv)
        runs_dir = args.runs_dir.resolve()
        check_writable(out=args.out.parent)
        if not args.tables_only:
            check_writable(runs_dir=runs_dir)
            if runs is not None:
                check_overrides(runs(args))
        return args, runs_dir


def shared_jobs(args) -> int:
    """How many runs shared the device: this call's --jobs; with --tables-only, the committed
    file's unless --jobs N is given (records trained N at once elsewhere)."""
    if args.tables_only and args.jobs == 1:
        return previous_meta(args.out).get("jobs", 1)
    return args.jobs


def file_meta(
    args,
    script: str,
    n_jobs: int,
    first: dict | None = None,
    overrides=(),
    keep_command: bool = False,
    **extra,
) -> dict:
    """A results file's meta: the command (scripts/<script> with --jobs `n_jobs` and `overrides`;
    on a --tables-only rebuild with `keep_command`, the committed file's), the device, torch and
    commit of the `first` record (when given), the date, `extra`, then the note. A rebuild keeps
    the committed date and note (`results_meta`)."""
    kept = results_meta(args.out, args.tables_only)
    command = (
        f"python3 scripts/{script}"
        + (f" --jobs {n_jobs}" if n_jobs > 1 else "")
        + "".join(f" {o}" for o in overrides)
    )
    meta = {"command": (keep_command and kept["command"]) or command}
    if first is not None:
        meta.update({key: first[key] for key in ("device", "torch", "git_sha")})
    meta.update(date=kept["date"], **extra)
    if kept["note"]:
        meta["note"] = kept["note"]
    return meta


def note_lines(meta: dict) -> list:
    """A results page's lines for its meta's note (none without one)."""
    return [meta["note"], ""] if meta.get("note") else []


def write_results(out: Path, payload: dict, text: str) -> None:
    """<out>.json (`payload`) and <out>.md (`text`), each by temp-and-rename; `text` printed."""
    write_text(out.with_suffix(".json"), json.dumps(payload, indent=1))
    write_text(out.with_suffix(".md"), text)
    print(text)
