"""Short in-process training runs: loss falls, metric names, summary, resume, eval_only, sinks,
torch.compile."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import moa_train
from moa_train.config import VARIANTS
from moa_train.data import load_data
from moa_train.train.checkpoint import find_checkpoint, load_checkpoint
from moa_train.train.evaluate import evaluate

MODELS = list(VARIANTS)  # every registered attention variant
# routed variants -> choices per routing site at TINY's 4 heads (moa: experts; moas: schemes; mae:
# experts = heads; moh: the 3 routed heads beside its shared one)
ROUTED = {"moas_dynamic": 3, "moa": 4, "moas_kv": 3, "mae": 4, "moh": 3}
ROPE_PRESETS = {"mla", "switchhead"}  # rotary positions: no wpe table
# d_model 32: four 8-wide heads, so GQA (2 K/V heads) differs from MHA and MQA
TINY = ("model.n_head=4",)

TRAIN_KEYS = {"train/loss", "lr", "perf/step_ms", "perf/tokens_per_s", "perf/mfu"}
VAL_KEYS = {"val/loss", "val/ppl", "val/bpc", "val/word_ppl"}
AUX_KEYS = {"train/aux/balance", "train/aux/z", "train/aux/cv"}
SUMMARY_KEYS = {
    "params_total",
    "params_non_embedding",
    "val/loss",
    "val/loss_best",
    "test/loss",
    "steps",
    "wall_s",
    "step_ms_median",
    "device_name",
    "torch_version",
    "git_sha",
}


def train_lines(records: list) -> list:
    return [r for r in records if "train/loss" in r]


@pytest.mark.parametrize("model", MODELS)
def test_short_run_loss_falls(train_run, tmp_path, model):
    steps = 50
    summary, records = train_run(
        tmp_path,
        f"model={model}",
        *TINY,
        f"trainer.max_steps={steps}",
        "optim.lr=3e-3",
        "schedule=constant",
        "schedule.warmup_steps=0",
        "trainer.log_interval=5",
        "trainer.eval_interval=25",
    )
    assert all("step" in r for r in records)
    train = train_lines(records)
    assert [r["step"] for r in train] == list(range(5, steps + 1, 5))
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.5
    for r in train:
        assert set(r) >= TRAIN_KEYS, TRAIN_KEYS - set(r)
        assert r["lr"] == pytest.approx(3e-3)
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in TRAIN_KEYS)
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [25, 50]
    assert all(set(r) >= VAL_KEYS for r in val)

    routed_keys = {k for r in train for k in r if k.startswith(("routing/", "train/aux/"))}
    if model in ROUTED:
        for r in train:
            assert set(r) >= AUX_KEYS
            for site in ("layer0", "layer1"):
                assert f"routing/entropy/{site}" in r
                util = [v for k, v in r.items() if k.startswith(f"routing/util/{site}/")]
                assert len(util) == ROUTED[model]
                assert sum(util) == pytest.approx(1.0, abs=1e-5)
    else:
        assert not routed_keys

    assert set(summary) >= SUMMARY_KEYS, SUMMARY_KEYS - set(summary)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["val/loss"] == pytest.approx(summary["val/loss"]) and on_disk["steps"] == steps
    assert summary["steps"] == steps
    assert summary["val/loss"] == pytest.approx(val[-1]["val/loss"])
    assert summary["val/loss_best"] == pytest.approx(min(r["val/loss"] for r in val))
    assert summary["params_non_embedding"] > 0
    if model in ROPE_PRESETS:  # no position table: nothing to leave out
        assert summary["params_total"] == summary["params_non_embedding"]
    else:
        assert summary["params_total"] > summary["params_non_embedding"]
    assert summary["torch_version"] == torch.__version__
    assert math.isfinite(summary["test/loss"])
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert kept == ["best.pt", f"step_{steps:07d}.pt"]  # keep_checkpoints=1, plus the best


def test_grad_accum_matches_one_big_batch(train_run, tmp_path):
    """batch 4 as 2 or 4 micro-batches: the same windows and the same mean gradient, so the same
    losses."""
    common = ("model=mha", *TINY, "trainer.max_steps=3", "trainer.log_interval=1")
    losses = {}
    for accum in (1, 2, 4):
        _, records = train_run(tmp_path / str(accum), *common, f"trainer.grad_accum={accum}")
        losses[accum] = [r["train/loss"] for r in train_lines(records)]
    assert len(losses[1]) == 3
    assert losses[2] == pytest.approx(losses[1], abs=1e-5)
    assert losses[4] == pytest.approx(losses[1], abs=1e-5)


# --- load_run, eval_only, resume ------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(train_run, tmp_path_factory):
    """A tiny moa run of 20 steps (debug=tiny): its folder and summary."""
    run_dir = tmp_path_factory.mktemp("finished_run")
    summary, _ = train_run(run_dir, "model=moa", *TINY)
    return run_dir, summary


def test_load_run_returns_checkpoint_weights(finished_run):
    run_dir, _ = finished_run
    model, cfg = moa_train.load_run(run_dir)
    assert not model.training
    assert cfg.model.name == "moa" and cfg.model.n_head == 4
    state = load_checkpoint(find_checkpoint(run_dir))["model"]
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_eval_only_matches_loaded_model(finished_run, train_run, make_cfg, tmp_path):
    run_dir, _ = finished_run
    _, records = train_run(
        tmp_path, "model=moa", *TINY, "trainer.eval_only=true", f"trainer.resume={run_dir}"
    )
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["steps"] == 20
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # evaluation writes no checkpoint
    assert not train_lines(records)

    model, cfg = moa_train.load_run(run_dir)
    data = load_data(make_cfg().data)
    t = cfg.trainer
    for split in ("val", "test"):
        expected = evaluate(
            model,
            data.splits[split],
            split,
            t.eval_batch_size or t.batch_size,
            t.block_size,
            t.eval_iters,
            torch.device("cpu"),
        )
        assert summary[f"{split}/loss"] == pytest.approx(expected[f"{split}/loss"], abs=1e-6)
        assert summary[f"{split}/bpc"] == pytest.approx(expected[f"{split}/bpc"], abs=1e-6)


def test_checkpoint_averaging_keeps_its_files_and_follows_a_resume_into_a_new_folder(
    train_run, tmp_path
):
    """task.average_last=3 keeps 3 step files although trainer.keep_checkpoints=1, and a finished
    run resumed into a new folder (trainer.resume=PATH) averages the checkpoints of the folder it
    came from."""
    common = (
        "model=mha",
        *TINY,
        "trainer.max_steps=20",
        "trainer.save_interval=5",
        "trainer.keep_checkpoints=1",
        "task.average_last=3",
    )
    first, _ = train_run(tmp_path / "first", *common)
    assert first["test/averaged_checkpoints"] == 3
    assert len(list((tmp_path / "first" / "checkpoints").glob("step_*.pt"))) == 3
    again, _ = train_run(tmp_path / "again", *common, f"trainer.resume={tmp_path / 'first'}")
    assert again["steps"] == 20 and again["test/averaged_checkpoints"] == 3
    assert again["test/loss"] == pytest.approx(first["test/loss"], abs=1e-6)


def test_eval_only_without_checkpoint_is_an_error(make_cfg, tmp_path):
    from moa_train.config import ConfigError
    from moa_train.train.loop import train

    with pytest.raises(ConfigError, match="trainer"):
        train(make_cfg("trainer.eval_only=true", "trainer.resume=auto"), tmp_path)


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path):
    from moa_train.train.checkpoint import CheckpointError

    path = tmp_path / "checkpoints" / "step_0000010.pt"
    path.parent.mkdir()
    path.write_bytes(b"not a checkpoint")
    assert find_checkpoint(tmp_path) == path
    with pytest.raises(CheckpointError, match=re.escape("step_0000010.pt")):
        load_checkpoint(path)


def test_resume_auto_continues_from_checkpoint(train_run, tmp_path):
    first, _ = train_run(tmp_path, "model=moas_dynamic", *TINY)
    assert first["steps"] == 20
    summary, records = train_run(
        tmp_path, "model=moas_dynamic", *TINY, "trainer.max_steps=30", "trainer.resume=auto"
    )
    assert summary["steps"] == 30
    steps = [r["step"] for r in train_lines(records)]
    # no duplicates: steps 1-20 were not re-run
    assert steps == sorted(set(steps)) == [5, 10, 15, 20, 25, 30]
    assert summary["tokens_seen"] == 30 * 4 * 32
    assert find_checkpoint(tmp_path).name == "step_0000030.pt"
    # wall_s counts both sessions (the first up to its last checkpoint), wall_s_session this one
    assert (
        summary["wall_s_session"] < summary["wall_s"] and summary["wall_s"] > first["wall_s"] * 0.5
    )


def test_resume_after_lost_checkpoint_drops_later_lines(train_run, tmp_path):
    """A run that died after logging past its last checkpoint: the resumed run re-logs those steps
    once."""
    common = ("model=mha", *TINY, "trainer.keep_checkpoints=2")
    train_run(tmp_path, *common)
    (tmp_path / "checkpoints" / "step_0000020.pt").unlink()  # as if it died before the step-20 save
    summary, records = train_run(tmp_path, *common)
    assert summary["steps"] == 20
    steps = [r["step"] for r in train_lines(records)]
    assert steps == [5, 10, 15, 20]
    assert [r["step"] for r in records if "val/loss" in r] == [10, 20]
    assert len([r for r in records if "test/loss" in r]) == 1


def test_resumed_run_equals_uninterrupted_run(train_run, tmp_path):
    """Resuming restores weights, optimizer, schedule, RNG and data order: the losses match a
    straight run."""
    common = ("model=moa", *TINY, "trainer.eval_interval=10")
    straight, straight_records = train_run(tmp_path / "straight", *common, "trainer.max_steps=20")
    train_run(tmp_path / "split", *common, "trainer.max_steps=10")
    resumed, resumed_records = train_run(tmp_path / "split", *common, "trainer.max_steps=20")
    a = {r["step"]: r["train/loss"] for r in train_lines(straight_records)}
    b = {r["step"]: r["train/loss"] for r in train_lines(resumed_records)}
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    assert resumed["val/loss"] == pytest.approx(straight["val/loss"], abs=1e-5)


# --- sinks ----------------------------------------------------------------------------------------


def test_tensorboard_has_the_jsonl_scalars(train_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, records = train_run(tmp_path, "model=moa", *TINY, "logger=tensorboard")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    keys = set().union(*records) - {"step"}
    assert tags == keys
    logged = [(r["step"], r["train/loss"]) for r in train_lines(records)]
    got = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in got] == [s for s, _ in logged]
    assert [v for _, v in got] == pytest.approx([v for _, v in logged], rel=1e-6)
    # the richer figure, also sent to W&B
    assert events.Tags()["images"] == ["routing/utilisation_heatmap"]


# --- torch.compile --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["moas_dynamic", "moa"])
def test_compile_matches_eager(train_run, tmp_path, model):
    from torch._dynamo.utils import counters

    common = (f"model={model}", *TINY, "trainer.max_steps=3", "trainer.log_interval=1")
    _, eager = train_run(tmp_path / "eager", *common)
    torch._dynamo.reset()
    counters.clear()
    _, compiled = train_run(tmp_path / "compiled", *common, "trainer.compile=true")
    assert counters["stats"]["unique_graphs"] >= 1  # the model really went through dynamo
    assert not counters["graph_break"]  # and without graph breaks
    assert not counters["inductor"]  # CPU default backend: aot_eager, not inductor
    first = lambda records: train_lines(records)[0]  # noqa: E731
    assert first(compiled)["step"] == first(eager)["step"] == 1
    assert first(compiled)["train/loss"] == pytest.approx(first(eager)["train/loss"], abs=1e-4)
    assert len(train_lines(compiled)) == 3


# --- fixes found while writing the suite ----------------------------------------------------------


def test_logged_lr_is_the_lr_the_step_used(train_run, tmp_path):
    _, records = train_run(
        tmp_path,
        "model=mha",
        *TINY,
        "schedule=constant",
        "schedule.warmup_steps=10",
        "optim.lr=1e-3",
        "trainer.log_interval=1",
        "trainer.max_steps=3",
    )
    lrs = [r["lr"] for r in train_lines(records)]
    # linear warmup: step s (1-based) runs at s/10 * lr
    assert lrs == pytest.approx([1e-4, 2e-4, 3e-4])


def test_rerunning_a_finished_run_keeps_one_test_line(train_run, tmp_path):
    train_run(tmp_path, "model=mha", *TINY)
    _, records = train_run(tmp_path, "model=mha", *TINY)
    assert len([r for r in records if "test/loss" in r]) == 1


def test_checkpoint_of_another_model_is_refused(train_run, tmp_path):
    from moa_train.config import ConfigError

    train_run(tmp_path, "model=mha", *TINY)
    with pytest.raises(
        ConfigError, match=re.escape("model.name is 'mha' in the checkpoint but 'moa' now")
    ):
        train_run(tmp_path, "model=moa", *TINY)


def test_split_shorter_than_a_block_is_a_data_error(tmp_path):
    import numpy as np

    from moa_train.data import DataError
    from moa_train.data.batches import RandomWindows

    with pytest.raises(DataError, match=re.escape("trainer.block_size")):
        RandomWindows(np.arange(10, dtype=np.uint16), 2, 16, 0, torch.device("cpu"))


def test_progress_bars_stay_quiet_off_a_terminal(train_run, tmp_path, capsys):
    train_run(tmp_path, "model=mha", *TINY)
    err = capsys.readouterr().err
    assert "it/s" not in err and "step/s" not in err and "train:" not in err


def test_wandb_offline_run_lives_in_the_run_folder(train_run, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb's service closes (flushes) the run's file when it handles the finish message, after
    # run.finish() returns; on a loaded machine that comes late. Here it never comes: the file must
    # be complete all the same.
    from wandb.sdk.lib.service.service_connection import ServiceConnection

    monkeypatch.setattr(ServiceConnection, "inform_finish", lambda self, run_id: None)
    _, records = train_run(tmp_path, "model=moa", *TINY, "logger=wandb", "trainer.max_steps=5")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # mode auto without an API key: offline, under the run folder
    log_file = next(runs[0].glob("*.wandb"))
    content = log_file.read_bytes()
    assert b"routing/util/layer0/0" in content  # the same scalar names as metrics.jsonl
    assert b"charts/utilisation/layer1" in content  # one utilisation chart per routed site
    assert b"routing/utilisation_heatmap" in content  # the same heatmap figure as TensorBoard's
    assert train_lines(records)  # metrics.jsonl is still written beside it


def test_wandb_names_come_from_the_experiment_and_overrides(make_cfg):
    from moa_train.metrics.sinks import wandb_mode, wandb_names

    cfg = make_cfg("model=moa", "logger=wandb", "logger.wandb.tags=[x]")
    names = wandb_names(cfg, ["model=moa", "trainer.seed=3", "hydra.run.dir=/tmp/a"])
    assert names["group"] == cfg.experiment_name
    assert names["name"] == f"{cfg.experiment_name}[model=moa,trainer.seed=3]"
    assert names["tags"] == sorted({"moa", cfg.data.name, "x"})
    assert wandb_mode("offline") == "offline"


def test_train_steps_advance_the_counters_once_per_step(make_cfg, tmp_path):
    """Trainer.train_steps, the public unit of work (fit, moa-bench): each step advances the step
    and the tokens seen once; a fixed batch repeated gives the same loss twice on unchanged weights
    (lr 0)."""
    from moa_train.train.loop import Trainer

    trainer = Trainer(
        make_cfg("trainer.device=cpu", "model=mha", "optim.lr=1e-12", "model.dropout=0.0"), tmp_path
    )
    t = trainer.cfg.trainer
    out = trainer.train_steps(3)
    assert (trainer.step, trainer.tokens_seen) == (3, 3 * t.batch_size * t.block_size)
    assert out.ce.shape == () and not out.skipped
    fixed = trainer.draw_batches()
    first, second = (trainer.train_steps(1, batches=fixed).ce.item() for _ in range(2))
    assert first == pytest.approx(second, rel=1e-6) and trainer.step == 5


def test_an_mfu_above_100_percent_names_the_stale_peak_once(
    train_run, tmp_path, monkeypatch, caplog
):
    """A peak measured while other work ran reads low, and MFU then above 100%: one warning names
    the peak file (deleting it measures again)."""
    import logging

    import moa_train.train.loop as loop

    monkeypatch.setattr(loop, "peak_flops", lambda *args: 1.0)  # far below any real rate
    with caplog.at_level(logging.WARNING, logger="moa_train.train.loop"):
        _, records = train_run(tmp_path, "model=mha", *TINY)
    assert all(r["perf/mfu"] > 1 for r in records if "perf/mfu" in r)
    warnings = [r.message for r in caplog.records if "perf/mfu is above 100%" in r.message]
    assert len(warnings) == 1 and "peak_flops.json" in warnings[0]


def test_the_peak_is_measured_once_into_its_own_file(train_run, tmp_path, monkeypatch):
    """The peak FLOP/s is measured the first time a device needs it, into MOA_PEAK_FLOPS_FILE (not
    the data cache), and read from there afterwards: never measured again by a run, not even when
    the run's rate beats it."""
    import json

    from moa_train.metrics import flops

    measured = []
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda d, k: measured.append(k) or 1.0)
    peak_file = tmp_path / "device" / "peaks.json"
    monkeypatch.setenv("MOA_PEAK_FLOPS_FILE", str(peak_file))
    cache = tmp_path / "cache"
    for run in ("a", "b"):
        train_run(tmp_path / run, "model=mha", *TINY, f"data.cache_dir={cache}")
    assert measured == ["fp32"]
    assert list(json.loads(peak_file.read_text()).values()) == [1.0]
    assert not (cache / "peak_flops.json").exists()
