"""The package's layers (pyproject.toml's [tool.importlinter] contract): no module imports one of a
higher layer, imports inside functions included, and every top-level module has a layer."""

import subprocess
import sys
from pathlib import Path

import moa_train

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_runs_up_the_layers():
    """In a subprocess: import-linter configures logging with disable_existing_loggers, which in
    this process would silence every logger already created (tests that read warnings with caplog
    then failed when run after it)."""
    # the checkout's package is the one checked
    assert Path(moa_train.__file__).parent == ROOT / "moa_train"
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
