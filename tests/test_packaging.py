"""The installed package must ship every subpackage and the configs (pyproject lists them explicitly)."""
import tomllib
from pathlib import Path

import moa_train.paths

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_folder():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "moa_train").rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert "moa_train.configs" in listed


def test_configs_found_from_checkout():
    assert moa_train.paths.config_dir() == ROOT / "configs"
    assert (moa_train.paths.config_dir() / "train.yaml").is_file()
