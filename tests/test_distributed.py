"""Data parallelism on the CPU: two gloo processes started by torchrun train like one process on the
same global batch, write one run folder, and resume across world sizes (DDP and FSDP2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, read_jsonl
from moa_train.config import applicable

# dropout off, so one process and two ranks compute the same function; log every step to compare
# every step
COMMON = (
    "model.n_head=4",
    "model.dropout=0.0",
    "model.gate_dropout=0.0",
    "trainer.log_interval=1",
    "trainer.eval_interval=10",
)
# float32: the ranks' gradients are summed in another order than one batch's (seen here: < 1e-6)
TOL = 1e-5


def torchrun(cwd: Path, data_root: Path, cache_dir: Path, *overrides: str) -> str:
    """`torchrun --nproc_per_node=2 -m moa_train ...` on the CPU (gloo); returns its output."""
    env = {
        **os.environ,
        "MOA_DATA_DIR": str(data_root),
        "MOA_CACHE_DIR": str(cache_dir),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "moa_train",
        "trainer.device=cpu",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def losses(records: list) -> dict:
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def assert_same_run(got: list, reference: list) -> None:
    """Every train loss `got` logged, and its validation losses, as in `reference`."""
    ref, ref_val = (
        losses(reference),
        {r["step"]: r["val/loss"] for r in reference if "val/loss" in r},
    )
    assert losses(got)
    for step, loss in losses(got).items():
        assert loss == pytest.approx(ref[step], abs=TOL), step
    for r in got:
        if "val/loss" in r:
            assert r["val/loss"] == pytest.approx(ref_val[r["step"]], abs=TOL), r["step"]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_resumes_one_process_in_one_folder_and_one_process_resumes_it(
    train_run, data_root, cache_dir, tmp_path
):
    """moas_dynamic with accumulation: steps 1-5 in one process, 6-10 on two DDP ranks (2 ranks x 2
    micro-batches of 1 sequence), 11-20 in one process: the losses, global routing statistics and
    aux terms of one uninterrupted process; rank 0 alone writes one run folder, named by Hydra's
    default pattern."""
    common = ("model=moas_dynamic", *COMMON, "trainer.grad_accum=2")
    _, reference = train_run(tmp_path / "reference", *common, "trainer.max_steps=20")
    train_run(tmp_path / "first", *common, "trainer.max_steps=5")

    launch = tmp_path / "launch"
    launch.mkdir()
    out = torchrun(
        launch,
        data_root,
        cache_dir,
        "debug=tiny",
        *common,
        "trainer.max_steps=10",
        f"trainer.resume={tmp_path / 'first'}",
    )
    # one folder for both ranks (debug=tiny: under outputs/debug)
    (run_dir,) = (launch / "outputs" / "debug" / "runs").glob("*/*")
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra",
        "checkpoints",
        "metrics.jsonl",
        "summary.json",
        "tokenizer.json",
        "train.log",
    ]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert [n for n in names if not n.endswith(".sha256")] == ["best.pt", "step_0000010.pt"], names
    log = (run_dir / "train.log").read_text()
    # rank 1 logs neither to the file nor (below warnings) to stdout
    assert log.count("step 10: val/loss") == 1
    assert out.count("step 10: val/loss") == 1
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert sorted(losses(records)) == list(range(6, 11))
    assert_same_run(records, reference)
    expected = {(r["step"], k): v for r in reference for k, v in r.items()}
    for r in records:
        for key in (
            k
            for k in r
            if k.startswith(("routing/", "train/aux/")) or k in ("grad_norm", "tokens_seen")
        ):
            assert r[key] == pytest.approx(expected[r["step"], key], rel=1e-3, abs=1e-6), (
                r["step"],
                key,
            )

    _, resumed = train_run(run_dir, *common, "trainer.max_steps=20")  # 2 ranks -> 1 process
    assert sorted(losses(resumed)) == list(range(6, 21))
    assert_same_run(resumed, reference)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_resumes_one_process_and_one_process_resumes_fsdp(
    train_run, data_root, cache_dir, tmp_path
):
    """mha: steps 1-10 in one process, 11-20 on two FSDP ranks, 21-30 in one process again: the
    losses of one uninterrupted run (weights, AdamW state, schedule and data position cross world
    sizes)."""
    common = ("model=mha", *applicable("mha", COMMON))
    _, reference = train_run(tmp_path / "reference", *common, "trainer.max_steps=30")
    run_dir = tmp_path / "run"
    train_run(run_dir, *common, "trainer.max_steps=10")
    torchrun(
        tmp_path,
        data_root,
        cache_dir,
        "debug=tiny",
        *common,
        "trainer.max_steps=20",
        "trainer.strategy=fsdp",
        f"hydra.run.dir={run_dir}",
    )
    _, records = train_run(run_dir, *common, "trainer.max_steps=30")
    assert sorted(losses(records)) == list(range(1, 31))
    assert_same_run(records, reference)


@pytest.mark.distributed
@pytest.mark.slow
def test_translation_ranks_split_sentences_and_train_like_one_process(
    compose_cfg, data_root, cache_dir, tmp_path
):
    """moa (k = E, so no ties at the zero-initialised router) on a copy task, task.max_tokens=200 as
    2 micro-batches: batches of 1 to 9 pairs, so rank 1 sometimes gets none; the per-token loss of
    the global batch, its masked routing statistics, and the gathered translations give the numbers
    of one process."""
    from moa_train.train.loop import train
    from moa_train.train.tasks import validate
    from test_translation_train import write_copy_corpus

    root = write_copy_corpus(tmp_path / "copy", n_train=300, n_eval=20)
    overrides = (
        "experiment=multi30k/moa",
        "data=wmt14_en_de",
        f"data.root={root}",
        "data.vocab_size=300",
        "task.max_tokens=200",
        "trainer.grad_accum=2",
        "model.d_model=32",
        "model.n_head=4",
        "model.n_layer=1",
        "model.n_encoder_layer=1",
        "model.n_experts=4",
        "model.top_k=4",
        "model.dropout=0.0",
        "trainer.max_steps=6",
        "trainer.eval_interval=6",
        "trainer.log_interval=1",
        "task.beam=2",
    )
    cfg = compose_cfg(*overrides, "trainer.device=cpu")
    validate(cfg)
    train(cfg, tmp_path / "one")
    torchrun(tmp_path, data_root, cache_dir, *overrides, f"hydra.run.dir={tmp_path / 'two'}")
    reference, records = (read_jsonl(tmp_path / run / "metrics.jsonl") for run in ("one", "two"))
    assert_same_run(records, reference)
    expected = {(r["step"], k): v for r in reference for k, v in r.items()}
    for r in records:
        for key in (
            k
            for k in r
            if k.startswith(("routing/", "train/aux/", "test/", "val/")) or k == "tokens_seen"
        ):
            assert r[key] == pytest.approx(expected[r["step"], key], rel=1e-3, abs=1e-5), (
                r["step"],
                key,
            )


@pytest.mark.distributed
@pytest.mark.slow
def test_eval_only_and_checkpoint_averaging_on_two_ranks(train_run, data_root, cache_dir, tmp_path):
    """Checkpoint averaging before the test evaluation (task.average_last) and trainer.eval_only
    give one process's numbers on two ranks: the averaged weights and the shared evaluation."""
    common = (
        "model=moas_dynamic",
        *COMMON,
        "trainer.max_steps=10",
        "trainer.save_interval=5",
        "trainer.keep_checkpoints=2",
        "task.average_last=2",
    )
    one, _ = train_run(tmp_path / "one", *common)
    torchrun(
        tmp_path, data_root, cache_dir, "debug=tiny", *common, f"hydra.run.dir={tmp_path / 'two'}"
    )
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["test/averaged_checkpoints"] == one["test/averaged_checkpoints"] == 2
    for key in ("val/loss", "test/loss"):
        assert two[key] == pytest.approx(one[key], abs=TOL), key

    evaluate = ("trainer.eval_only=true", f"trainer.resume={tmp_path / 'one'}")
    alone, _ = train_run(tmp_path / "eval_one", *common, *evaluate)
    torchrun(
        tmp_path,
        data_root,
        cache_dir,
        "debug=tiny",
        *common,
        *evaluate,
        f"hydra.run.dir={tmp_path / 'eval_two'}",
    )
    shared = json.loads((tmp_path / "eval_two" / "eval.json").read_text())
    for key in ("val/loss", "test/loss"):
        assert shared[key] == pytest.approx(alone[key], abs=TOL), key


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step(
    train_run, data_root, cache_dir, tmp_path
):
    """torchrun passes SIGTERM on to both ranks, which may see it in different steps: they agree at
    the next log step, write one checkpoint there and stop; one process resumes it to the losses of
    an uninterrupted run."""
    import signal
    import time

    common = (
        "model=moas_dynamic",
        *COMMON,
        "trainer.max_steps=200",
        "trainer.log_interval=5",
        "trainer.save_interval=10",
        "trainer.eval_interval=100",
    )
    env = {
        **os.environ,
        "MOA_DATA_DIR": str(data_root),
        "MOA_CACHE_DIR": str(cache_dir),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "moa_train",
            "trainer.device=cpu",
            "debug=tiny",
            *common,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 120
    while (
        not metrics.is_file() or metrics.read_text().count("train/loss") < 3
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    # the two ranks write to one pipe, so their lines can run together: match in the whole text
    stopped = [int(n) for n in re.findall(r"stopped by SIGTERM at step (\d+)", out)]
    assert len(stopped) == 2 and stopped[0] == stopped[1], out  # both ranks, the same step
    step = stopped[0]
    assert step % 5 == 0 and step < 200, out  # a log step, before the end
    assert (run_dir / "checkpoints" / f"step_{step:07d}.pt").is_file()

    _, reference = train_run(tmp_path / "reference", *common)
    _, records = train_run(run_dir, *common)
    assert sorted(losses(records)) == list(range(5, 201, 5))  # each logged step once
    assert_same_run(records, reference)


@pytest.mark.distributed
@pytest.mark.slow
def test_max_time_and_early_stopping_stop_every_rank_at_one_step(data_root, cache_dir, tmp_path):
    """trainer.max_time: the ranks agree at a log step, in the all-reduce that agrees on signals;
    early stopping: at a validation. The finished run's command, run again, ends on every rank
    before anything is written (no rank waits for another)."""
    run_dir = tmp_path / "run"
    common = (
        "debug=tiny",
        "model=mha",
        *COMMON[:1],
        "trainer.max_steps=20",
        "trainer.log_interval=5",
        "trainer.eval_interval=5",
        f"hydra.run.dir={run_dir}",
    )
    torchrun(tmp_path, data_root, cache_dir, *common, "trainer.max_time=0.000001")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "max_time" and summary["steps"] == 5  # the first log step
    assert summary["world_size"] == 2
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*.pt")] == ["step_0000005.pt"]

    # validations at 5 (the best) and 10 (not 100 nats lower): stopped at 10
    early = ("trainer.early_stopping.patience=1", "trainer.early_stopping.min_delta=100")
    torchrun(tmp_path, data_root, cache_dir, *common, *early)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stopping" and summary["steps"] == 10
    assert "test/loss" in summary

    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    out = torchrun(tmp_path, data_root, cache_dir, *common, *early)
    assert "this run finished at step 10 (early stopping)" in out
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_train_like_one(train_run, data_root, cache_dir, tmp_path):
    """The NCCL path: 2 GPUs (DDP) and 1 GPU, moas_dynamic with accumulation, fp32 without TF32."""
    common = ("model=moas_dynamic", *COMMON, "trainer.grad_accum=2", "trainer.device=cuda")
    _, reference = train_run(tmp_path / "reference", *common, "trainer.max_steps=10")
    torchrun(
        tmp_path,
        data_root,
        cache_dir,
        "debug=tiny",
        *common,
        "trainer.max_steps=10",
        f"hydra.run.dir={tmp_path / 'two'}",
    )
    records = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert losses(records).keys() == losses(reference).keys()
    for step, loss in losses(records).items():
        assert loss == pytest.approx(losses(reference)[step], abs=1e-4), step


# --- pieces, in one process -----------------------------------------------------------------------


def test_batch_that_does_not_split_over_the_ranks_is_a_config_error(make_cfg):
    from moa_train.config import ConfigError
    from moa_train.train.tasks import validate

    cfg = make_cfg("trainer.batch_size=6", "trainer.grad_accum=2")
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"trainer.batch_size: 6 .* 2 ranks .* multiples of 4"):
        validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match=re.escape("trainer.strategy")):
        validate(make_cfg("trainer.strategy=zero"))


def test_ranks_slice_the_global_batch_of_windows():
    from moa_train.data.batches import RandomWindows

    tokens = np.arange(1000, dtype=np.uint16)
    one = RandomWindows(tokens, 6, 8, seed=3, device=torch.device("cpu"))
    ranks = [
        RandomWindows(tokens, 6, 8, seed=3, device=torch.device("cpu"), rank=r, world=3)
        for r in range(3)
    ]
    for _ in range(2):
        x, y = one.next()
        parts = [w.next() for w in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(
            torch.cat([p[1] for p in parts]), y
        )
    assert all(
        torch.equal(w.state_dict()["generator"], one.state_dict()["generator"]) for w in ranks
    )


def test_ranks_slice_each_batch_of_sentence_pairs():
    from moa_train.data.translation import ParallelSplit, TokenBatches

    rng = np.random.default_rng(0)
    src = [rng.integers(4, 50, rng.integers(1, 9)).astype(np.int32) for _ in range(40)]
    tgt = [rng.integers(4, 50, rng.integers(1, 9)).astype(np.int32) for _ in range(40)]
    split = ParallelSplit(src, tgt, [""] * 40, [""] * 40)

    def make(rank, world):
        return iter(TokenBatches(split, 60, 0, 1, 2, seed=5, rank=rank, world=world))

    one, ranks = make(0, 1), [make(r, 3) for r in range(3)]
    sizes = set()
    for _ in range(12):
        whole, parts = next(one), [next(r) for r in ranks]
        # the global batch's tokens
        assert [p["n_tokens"] for p in parts] == [whole["n_tokens"]] * 3
        assert torch.equal(torch.cat([p["index"] for p in parts]), whole["index"])
        # each slice padded to its own longest pair, the same rows as in the whole batch
        for p in parts:
            rows = [np.flatnonzero(whole["index"].numpy() == i)[0] for i in p["index"].tolist()]
            assert torch.equal(p["tgt_out"], whole["tgt_out"][rows, : p["tgt_out"].shape[1]])
        sizes |= {len(p["index"]) for p in parts}
    assert 0 in sizes  # some batch held fewer pairs than ranks


def test_evaluation_shares_batches_in_rounds():
    from moa_train.train.distributed import Dist, rank_share

    shares = [list(rank_share(range(5), Dist(rank, 2))) for rank in range(2)]
    assert shares[0] == [(0, True), (2, True), (4, True)]
    # a pass in step with rank 0, not counted
    assert shares[1] == [(1, True), (3, True), (4, False)]
    assert list(rank_share(range(3), Dist())) == [(0, True), (1, True), (2, True)]


@pytest.mark.distributed
def test_ddp_takes_the_configured_gradient_bucket(tmp_path):
    """trainer.ddp_bucket_mb reaches DistributedDataParallel (a one-process gloo group stands in for
    torchrun's)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from moa_train.train.distributed import Dist, wrap

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = wrap(torch.nn.Linear(8, 8), "ddp", Dist(0, 2), torch.device("cpu"), bucket_mb=3.0)
        assert isinstance(model, DistributedDataParallel)
        assert model.bucket_bytes_cap == 3 * 1024 * 1024
        assert model.gradient_as_bucket_view
    finally:
        dist.destroy_process_group()


# --- the 2-GPU benchmark's driver -----------------------------------------------------------------


@pytest.mark.parametrize("gpus", [1, 2])
def test_benchmark_runs_are_valid_configs(compose_cfg, gpus):
    from moa_train.results.multigpu import MODELS, overrides
    from moa_train.train.tasks import validate

    for model in MODELS:
        cfg = compose_cfg(*overrides(model, gpus, batch=16, steps=60, log_interval=10))
        validate(cfg, world_size=gpus)
        assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.trainer.block_size) == (
            12,
            768,
            12,
            1024,
        )
        assert (
            cfg.trainer.batch_size == 16 * gpus
            and cfg.trainer.compile
            and cfg.trainer.precision == "bf16"
        )


def test_benchmark_tables_from_run_records(tmp_path):
    """Steady-state tok/s is the median of the windows after the first; efficiency = tok/s(2) / (2
    tok/s(1))."""
    from moa_train.results.multigpu import main

    speeds = {
        ("mha", 1): [10, 1000, 1010, 990],
        ("mha", 2): [5, 1900, 1800, 1850],
        ("moas_dynamic", 1): [10, 800, 800, 800],
        ("moas_dynamic", 2): [5, 1360, 1360, 1360],
    }
    for (model, gpus), windows in speeds.items():
        run = tmp_path / "runs" / f"{model}-{gpus}gpu"
        run.mkdir(parents=True)
        lines = [
            {"step": 10 * (i + 1), "perf/tokens_per_s": v, "perf/step_ms": 1e3 / v, "perf/mfu": 0.4}
            for i, v in enumerate(windows)
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (run / "summary.json").write_text(
            json.dumps(
                {
                    "world_size": gpus,
                    "steps": 40,
                    "tokens_seen": 40 * 16384 * gpus,
                    "params_total": 124_000_000,
                    "device_name": "NVIDIA H200",
                    "torch_version": "2.11.0",
                    "git_sha": "abc",
                }
            )
        )
    out = tmp_path / "multigpu"
    main(["--tables-only", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["results"]["mha"]["efficiency"] == pytest.approx(1850 / 2000)
    assert res["results"]["moas_dynamic"]["efficiency"] == pytest.approx(0.85)
    assert res["meta"]["log_interval"] == 10 and res["meta"]["device"] == "NVIDIA H200"
    text = out.with_suffix(".md").read_text()
    assert "| mha | 2 | 124.0M | 32,768 | 1,850 | 925 |" in text
    assert "mha: scaling efficiency 92.5%, target >= 90%: met" in text
    assert "moas_dynamic: scaling efficiency 85.0%, target >= 90%: MISSED" in text
