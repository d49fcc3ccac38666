"""`moa-train` / `python -m moa_train`: compose the config with Hydra, validate it, train."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from moa_train.cli import precheck
from moa_train.config import ConfigError, validate
from moa_train.paths import config_dir


def run(cfg) -> float | None:
    """Hydra task function; returns the final validation loss (the metric sweeps optimise)."""
    from moa_train.data import DataError
    from moa_train.train.checkpoint import CheckpointError
    from moa_train.train.loop import train

    try:
        validate(cfg)
        summary = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return summary.get("val/loss")


_hydra_main = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(run)


def main() -> None:
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):  # a plain run (not -m, --cfg, --help, ...): one-line errors
        precheck(args)
    _hydra_main()


if __name__ == "__main__":
    main()
