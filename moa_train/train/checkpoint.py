"""Checkpoints: written atomically (temp file, fsync, rename), the last N kept plus best.pt, checked on load."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    pass


def rng_state() -> dict:
    """This process's generators; of CUDA only the current device's (one per process: reading every GPU's would
    open a context on each GPU from every torchrun process)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_initialized():
        cuda = state["cuda"]  # checkpoints written before multi-GPU support hold a list: every device's state
        torch.cuda.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, list) else cuda)


def atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def step_checkpoints(folder: Path) -> list:
    """step_*.pt files, oldest first."""
    return sorted(folder.glob("step_*.pt"))


def save_checkpoint(state: dict, folder: Path, keep: int, is_best: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:07d}.pt"
    atomic_save(state, path)
    if is_best:
        atomic_save(state, folder / "best.pt")
    for old in step_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated or corrupt file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a moa_train checkpoint")
    return state


def find_checkpoint(target: Path) -> Path | None:
    """A checkpoint file as given, or the latest step_*.pt of a run folder (or of its checkpoints/ folder)."""
    if target.is_file():
        return target
    for folder in (target / "checkpoints", target):
        found = step_checkpoints(folder) if folder.is_dir() else []
        if found:
            return found[-1]
    return None


def average_checkpoints(paths: list, map_location="cpu") -> dict:
    """The element-wise mean of the model weights of several checkpoints (fairseq's average_checkpoints)."""
    total = None
    for path in paths:
        weights = load_checkpoint(path, map_location)["model"]
        if total is None:
            total = {k: v.double().clone() for k, v in weights.items()}
        else:
            for k, v in weights.items():
                total[k] += v.double()
    return {k: (v / len(paths)).to(weights[k].dtype) for k, v in total.items()}
