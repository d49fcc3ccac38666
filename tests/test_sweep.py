"""Multiruns: a failing job is recorded while the others go on; the sweep summary lists every job."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_failed_job_does_not_stop_the_sweep(data_root, cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "MOA_DATA_DIR": str(data_root), "MOA_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "moa_train", "-m", "debug=tiny", "model=mha,moa",
                           "trainer.max_steps=3", "model.top_k=2,9", f"hydra.sweep.dir={sweep}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 of 4 jobs failed" in proc.stderr  # moa with top_k 9 > n_experts 4; mha ignores top_k
    records = [json.loads(line) for line in (sweep / "sweep_summary.jsonl").read_text().splitlines()]
    assert len(records) == 4
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and "model=moa" in failed[0]["overrides"] and "model.top_k=9" in failed[0]["overrides"]
    assert "model.top_k" in failed[0]["error"]
    assert all(r["steps"] == 3 and r["val/loss"] > 0 for r in records if r["status"] == "ok")
    assert (sweep / failed[0]["job"] / "error.txt").is_file()
    assert "failed: error: model.top_k" in (sweep / "sweep_summary.md").read_text()
