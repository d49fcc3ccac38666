"""Python API over run folders."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def load_run(run_dir: str | Path, map_location: str = "cpu") -> tuple:
    """(model with the weights of the run's latest checkpoint that verifies and reads, in eval mode; the run's
    resolved config). A damaged checkpoint is skipped with a warning, as a resume does; nothing is locked or
    written, and nothing in the file runs (weights_only loading). The modules in MOA_PLUGINS are loaded first, so
    a run of a plugin's variant rebuilds."""
    from moa_train.plugins import load_plugins
    from moa_train.train.checkpoint import checkpoints_in, load_latest
    from moa_train.train.tasks import saved_task, task_class

    load_plugins()
    run_dir = Path(run_dir)
    if not checkpoints_in(run_dir):
        raise FileNotFoundError(f"no checkpoint under {run_dir} (expected checkpoints/step_*.pt)")
    _, state, _ = load_latest(run_dir, map_location, key="load_run")
    cfg: DictConfig = OmegaConf.create(state["config"])  # resolved as the run used it (env vars included)
    task = task_class(saved_task(state["config"]))
    model = task.build_model(cfg.model, state["vocab_size"], state.get("pad_id"))
    model.load_state_dict(state["model"])
    return model.to(map_location).eval(), cfg


__all__ = ["load_run"]
