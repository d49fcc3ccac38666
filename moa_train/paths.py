"""Where the Hydra configs are: `configs/` beside the package in a checkout (or an editable
install), else the copy shipped inside the installed package."""

from pathlib import Path


def config_dir() -> Path:
    package = Path(__file__).resolve().parent
    checkout = package.parent / "configs"
    return checkout if (checkout / "train.yaml").is_file() else package / "configs"


def repo_root() -> Path:
    """The checkout holding the package (where docs/results/ lives), else the working directory."""
    package = Path(__file__).resolve().parent
    return package.parent if (package.parent / "configs" / "train.yaml").is_file() else Path.cwd()
