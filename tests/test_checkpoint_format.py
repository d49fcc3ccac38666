"""Checkpoints are versioned (checkpoint_format) and older layouts are upgraded in one place
(moa_train/config_format.py) as they are read: the rest of the code reads one layout."""

from __future__ import annotations

import pytest
import torch

from conftest import read_jsonl
from moa_train.config_format import CHECKPOINT_FORMAT, upgrade_checkpoint
from moa_train.train.checkpoint import CheckpointError, load_checkpoint, sidecar

TINY = ("model=mha", "model.n_head=4", "trainer.log_interval=1")
# the keys that checkpoints of the first layout may lack
ADDED = (
    "checkpoint_format",
    "tokens_seen",
    "wandb_id",
    "pending_eval",
    "wall_s",
    "guard",
    "window",
    "early_stopping",
    "health",
    "last_sane",
    "pad_id",
    "tokenizer",
)


def test_a_first_layout_checkpoint_reads_as_a_fresh_runs_state():
    state = upgrade_checkpoint({"model": {}, "step": 3, "wandb_id": "abc"})
    assert state["checkpoint_format"] == CHECKPOINT_FORMAT
    assert state["step"] == 3 and state["wandb_id"] == "abc"  # what it holds is kept
    assert state["tokens_seen"] == 0 and state["pending_eval"] is False
    assert state["guard"] == {"skipped": 0, "streak": 0, "longest": 0}
    assert state["window"] == {"ce": 0.0, "applied": 0, "aux": {}}
    assert state["early_stopping"] == {"best": float("inf"), "best_step": None, "waited": 0}
    assert state["health"] == {"sane": True, "val": None} and state["last_sane"] is None


def test_a_current_checkpoint_is_left_as_it_is():
    state = {"model": {}, "step": 1, "checkpoint_format": CHECKPOINT_FORMAT, "guard": "kept"}
    assert upgrade_checkpoint(state) == state


def test_a_newer_checkpoint_is_refused_in_one_line(tmp_path):
    path = tmp_path / "step_0000001.pt"
    torch.save({"model": {}, "step": 1, "checkpoint_format": CHECKPOINT_FORMAT + 1}, path)
    with pytest.raises(CheckpointError, match="newer than this moa_train reads") as exc:
        load_checkpoint(path)
    assert "\n" not in str(exc.value)


def test_written_checkpoints_record_their_format_and_a_first_layout_one_resumes(
    train_run, tmp_path
):
    run = tmp_path / "run"
    train_run(run, *TINY, "trainer.max_steps=5", "trainer.eval_interval=5")
    path = run / "checkpoints" / "step_0000005.pt"
    state = torch.load(path, weights_only=True)
    assert state["checkpoint_format"] == CHECKPOINT_FORMAT
    assert {"guard", "window", "early_stopping", "best_val", "pending_eval"} <= set(state)
    old = {k: v for k, v in state.items() if k not in ADDED}
    torch.save(old, path)
    sidecar(path).unlink()  # (a first-layout file has none; it loads without verification)
    train_run(run, *TINY, "trainer.max_steps=7", "trainer.eval_interval=5")
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 8))
    assert load_checkpoint(run / "checkpoints" / "step_0000007.pt")["step"] == 7


def test_a_first_layout_rng_of_every_device_becomes_the_first_device_s():
    """Checkpoints written before multi-GPU support hold every visible device's CUDA generator (a
    list, torch.cuda.get_rng_state_all()); the process that wrote them never chose a device, so
    its current device, whose state the current layout holds, was the first."""
    first, second = torch.arange(4, dtype=torch.uint8), torch.arange(4, 8, dtype=torch.uint8)
    rng = {"python": (3, (1, 2), None), "numpy": ("MT19937",), "torch": torch.zeros(2)}
    state = upgrade_checkpoint(
        {"model": {}, "step": 3, "config": {}, "rng": {**rng, "cuda": [first, second]}}
    )
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["rng"]["cuda"] is first
    # a CPU run's state has no CUDA generator; a torchrun run's holds one state per rank
    assert upgrade_checkpoint({"model": {}, "step": 3, "rng": rng})["rng"] == rng
    per_rank = [{**rng, "cuda": first}, {**rng, "cuda": second}]
    assert upgrade_checkpoint({"model": {}, "step": 3, "rng": per_rank})["rng"] == per_rank


def test_a_current_checkpoint_s_rng_is_left_as_it_is():
    rng = {"python": (3, (1, 2), None), "torch": torch.zeros(2), "cuda": torch.ones(2)}
    state = {"model": {}, "step": 1, "checkpoint_format": CHECKPOINT_FORMAT, "rng": rng}
    assert upgrade_checkpoint(state)["rng"] is rng


def test_a_file_without_the_run_s_config_is_refused_in_one_line(tmp_path):
    """Every checkpoint moa_train has written holds the run's config (in every format): a file
    without it is no moa_train checkpoint, refused as it is read, not met later as a KeyError."""
    path = tmp_path / "step_0000001.pt"
    torch.save({"model": {}, "step": 1, "checkpoint_format": CHECKPOINT_FORMAT}, path)
    with pytest.raises(CheckpointError, match=r"is not a moa_train checkpoint$"):
        load_checkpoint(path)
