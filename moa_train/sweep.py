"""Multiruns: a job that fails is recorded in its folder while the others go on, and a summary of every job is
written at the end (a Hydra callback, configured in configs/train.yaml under hydra.callbacks)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

log = logging.getLogger(__name__)
SUMMARY_KEYS = ("val/loss", "val/bpc", "val/bleu", "test/loss", "test/bleu", "steps", "step_ms_median")


def record_failure(run_dir: Path, message: str) -> None:
    """error.txt in the job's folder: what the sweep summary reports for a failed job."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text(message.rstrip() + "\n")


def job_record(job_dir: Path) -> dict:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    record = {"job": job_dir.name, "overrides": " ".join(overrides)}
    if (job_dir / "summary.json").is_file():
        summary = json.loads((job_dir / "summary.json").read_text())
        return {**record, "status": "ok", **{k: summary[k] for k in SUMMARY_KEYS if k in summary}}
    error = (job_dir / "error.txt").read_text().strip().splitlines() if (job_dir / "error.txt").is_file() else []
    return {**record, "status": "failed", "error": error[0] if error else "no summary.json (killed?)"}


def markdown(records: list) -> str:
    keys = [k for k in SUMMARY_KEYS if any(k in r for r in records)]
    lines = ["| job | overrides | status | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for r in records:
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        status = r["status"] if r["status"] == "ok" else f"failed: {r['error']}"
        lines.append(f"| {r['job']} | {r['overrides']} | {status} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Writes sweep_summary.{jsonl,md} in the sweep folder; exits non-zero when any job failed."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted({p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")})
        records = [job_record(j) for j in jobs]
        (sweep_dir / "sweep_summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (sweep_dir / "sweep_summary.md").write_text(markdown(records))
        print(markdown(records), end="")
        failed = [r for r in records if r["status"] != "ok"]
        if failed:
            print(f"error: {len(failed)} of {len(records)} jobs failed (see {sweep_dir / 'sweep_summary.md'})",
                  file=sys.stderr)
            sys.exit(1)
