"""The package's layers (pyproject.toml's [tool.importlinter] contract): no module imports one of a higher layer,
imports inside functions included, and every top-level module has a layer."""
from pathlib import Path

import moa_train

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_runs_up_the_layers():
    from importlinter.cli import lint_imports

    assert Path(moa_train.__file__).parent == ROOT / "moa_train"  # the checkout's package is the one checked
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0, "see the report above"

