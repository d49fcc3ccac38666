"""Bad command-line overrides: `python -m moa_train` stops with a short error naming the key, no
traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, write_wikitext

# (overrides, words the output must contain); "{partial}" is a data root lacking
# wikitext-2/valid.txt. One case per stage (composition, validation, data) as a real process;
# tests/test_bad_input.py holds the full table in-process.
CASES = {
    "unknown_option": ("model=foo", ["model", "mha"]),
    "n_head": ("model.n_head=5", ["model.n_head"]),
    "missing_valid": ("data.root={partial}", ["valid.txt"]),
}


@pytest.fixture(scope="module")
def partial_root(tmp_path_factory):
    return write_wikitext(tmp_path_factory.mktemp("partial"), splits=("train", "test"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_override_is_one_short_error(case, data_root, partial_root, tmp_path):
    overrides, expected = CASES[case]
    args = overrides.format(partial=partial_root).split()
    env = {
        **os.environ,
        "MOA_DATA_DIR": str(data_root),
        "MOA_CACHE_DIR": str(tmp_path / "cache"),
        "HYDRA_FULL_ERROR": "0",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moa_train",
            "debug=tiny",
            f"hydra.run.dir={tmp_path / 'run'}",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    for word in expected:
        assert word in out, out
    allowed = re.search(r"allowed|valid", out, re.IGNORECASE)
    assert re.search(r"\berror\b", out, re.IGNORECASE) or allowed, out
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, out
    assert not (tmp_path / "run" / "checkpoints").exists()  # it stopped before training


# --- the help page and near-miss keys (issue 29) ----------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_our_page_without_internal_configs(flag, monkeypatch, capsys, tmp_path):
    from conftest import run_main

    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main([flag], monkeypatch, capsys)
    assert code in (0, None)
    assert "_schema_" not in out and "_common" not in out and "debug_model" not in out
    assert not re.search(r"(?<!\w)_fairseq", out)  # an experiment file others include
    assert "powered by Hydra" not in out  # Hydra's stock page is --hydra-help
    groups = re.search(r"groups.*?\n\n", out, re.S).group(0)
    assert re.search(r"^  model +.*\bmoas_dynamic\*", groups, re.M)  # the default marked
    wrapped = " ".join(groups.split())  # the options wrap over lines
    assert "moas_table1/{mha, moas_dynamic, moas_static}" in wrapped
    assert "trainer.max_steps" in out and "optim.lr" in out and "examples:" in out
    assert not list(tmp_path.iterdir())  # no run folder, nothing written
    assert max(map(len, out.splitlines())) <= 100  # a terminal of 100 columns does not wrap it


def test_every_main_key_of_the_help_page_exists():
    from omegaconf import OmegaConf

    from moa_train.cli import MAIN_KEYS
    from moa_train.config import compose_train

    cfg = compose_train([], return_hydra_config=True)
    missing = object()
    for key in MAIN_KEYS:
        node = key.split(" ")[0].rpartition(".")[0]
        for part in key.split(" / "):
            full = part if "." in part or not node else f"{node}.{part}"
            assert OmegaConf.select(cfg, full, default=missing) is not missing, full


@pytest.mark.parametrize(
    ("override", "suggested"),
    [
        ("trainer.lr=1", "did you mean optim.lr?"),  # the example: another node
        ("lr=1", "did you mean optim.lr?"),
        ("trainer.max_step=3", "did you mean trainer.max_steps?"),  # a spelling
        ("model.n_heads=4", "did you mean model.n_head?"),  # a variant's key
        ("zzz_key=1", "moa-train --help lists the main keys"),  # nothing near: where to look
    ],
)
def test_a_near_miss_key_names_the_key_meant(override, suggested, monkeypatch, capsys, tmp_path):
    from conftest import run_main

    monkeypatch.chdir(tmp_path)
    code, _, err = run_main([override], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and suggested in err[0], err
