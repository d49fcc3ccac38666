"""The installed package must ship every subpackage and the configs (pyproject lists them
explicitly)."""

import tomllib
from pathlib import Path

import moa_train.paths

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_folder():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "moa_train").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert "moa_train.configs" in listed


def test_configs_found_from_checkout():
    assert moa_train.paths.config_dir() == ROOT / "configs"
    assert (moa_train.paths.config_dir() / "train.yaml").is_file()


def test_every_extra_tool_is_pinned_in_the_constraints_file():
    """scripts/setup.sh installs the extras with constraints/ci.txt: each of their packages needs an
    exact pin there, inside pyproject's range (python3 scripts/pin_constraints.py rewrites the
    file)."""
    import importlib.util

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    spec = importlib.util.spec_from_file_location(
        "pin_constraints", ROOT / "scripts" / "pin_constraints.py"
    )
    pin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pin)
    lines = [
        line.split("#")[0].strip()
        for line in (ROOT / "constraints" / "ci.txt").read_text().splitlines()
    ]
    pins = dict(line.split("==") for line in lines if line)
    pins = {canonicalize_name(name): version for name, version in pins.items()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in map(Requirement, pin.requirements(project, pin.EXTRAS)):
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"constraints/ci.txt has no pin for {req.name}"
        assert req.specifier.contains(version, prereleases=True), (
            f"{req.name}=={version} is outside {req}"
        )
    assert "torch" not in pins  # a GPU image keeps its own torch
    assert set(pin.EXTRAS) <= set(project["optional-dependencies"])
