"""What importing a module loads: the leaf helpers stay light, and any module of the package can be
the first one a program imports (the variants and tasks still register)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(code: str) -> list:
    """The modules in sys.modules after running `code` in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", ["moa_train.paths", "moa_train.io"])
def test_leaf_helpers_import_no_torch_and_no_models(module):
    loaded = loaded_after(f"import {module}")
    heavy = [
        m
        for m in loaded
        if m.split(".")[0] in ("torch", "hydra", "omegaconf")
        or m.startswith(("moa_train.models", "moa_train.config", "moa_train.train"))
    ]
    assert heavy == []


@pytest.mark.parametrize(
    "module", ["moa_train.train.tasks", "moa_train.models.attention.mha", "moa_train.report"]
)
def test_any_module_imported_first_registers_the_variants_and_tasks(module):
    loaded = loaded_after(
        f"import {module}\nfrom moa_train.config import TASK_CONFIGS, VARIANTS\n"
        "assert {'mha', 'moa'} <= set(VARIANTS) and {'lm', 'translation'} <= set(TASK_CONFIGS)"
    )
    assert module in loaded
