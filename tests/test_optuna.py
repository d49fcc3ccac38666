"""Optuna sweeps (the [sweep] extra): in-memory and SQLite studies, and a crashed trial that does
not stop the sweep."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_blank_wikitext

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.slow  # each test runs a whole sweep
ROOT = Path(__file__).resolve().parents[1]


def sweep(data_root, cache_dir, sweep_dir, *extra):
    env = {**os.environ, "MOA_DATA_DIR": str(data_root), "MOA_CACHE_DIR": str(cache_dir)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "moa_train",
            "hparams_search=moas_dynamic_wikitext2",
            "debug=tiny",
            "trainer.max_steps=3",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep_dir}",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_trial_in_memory_study(data_root, cache_dir, tmp_path):
    proc = sweep(data_root, cache_dir, tmp_path / "s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    best = yaml.safe_load((tmp_path / "s" / "optimization_results.yaml").read_text())
    losses = [
        float(line.split('"val/loss": ')[1].split(",")[0])
        for line in (tmp_path / "s" / "sweep_summary.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 2 and best["best_value"] == pytest.approx(min(losses))
    assert set(best["best_params"]) == {
        "optim.lr",
        "optim.router_lr_mult",
        "model.aux.balance_coef",
    }


def test_sqlite_study_survives_a_crashed_trial(data_root, cache_dir, tmp_path):
    db = tmp_path / "study.db"
    # WikiText-2 files of white space only (a missing file would be refused before the sweep): the
    # trial fails loading them
    blank = write_blank_wikitext(tmp_path / "blank-data")
    # sampler seed 1 draws the data folder, then the blank one: the second trial fails, the sweep
    # goes on (an invalid value such as gate_dropout 1.5 is refused before the sweep starts, as in a
    # single run)
    proc = sweep(
        data_root,
        cache_dir,
        tmp_path / "s",
        "hydra.sweeper.sampler.seed=1",
        f"data.root=choice({data_root},{blank})",
        f"hydra.sweeper.storage=sqlite:///{db}",
    )
    assert proc.returncode == 1 and "1 of 2 jobs failed" in proc.stderr, proc.stderr[-2000:]
    study = optuna.load_study(study_name="moas_dynamic_wikitext2", storage=f"sqlite:///{db}")
    values = {t.params["data.root"]: t.value for t in study.trials}
    assert (
        len(study.trials) == 2
        and values[str(blank)] == float("inf")
        and values[str(data_root)] < 10
    )
    assert (tmp_path / "s" / "optimization_results.yaml").is_file()
