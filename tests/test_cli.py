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
