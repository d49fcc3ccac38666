"""The shared timing helper (moa_train.timing.repeat_times) and the statistic each measurement
reports from its repetitions. Bounds are generous: these check what is timed, not how fast."""

from __future__ import annotations

import gc
import time
from types import SimpleNamespace

import pytest
import torch

from moa_train.bench import common, decode
from moa_train.bench import train as bench_train
from moa_train.metrics import flops
from moa_train.timing import repeat_times


def test_repeat_times_honours_the_counts_and_measures_the_call():
    calls = []

    def fn():
        calls.append("fn")
        time.sleep(0.02)

    times = repeat_times(fn, 4, warmup=2, setup=lambda: calls.append("setup"))
    assert calls == ["setup", "fn"] * 6
    assert len(times) == 4
    assert all(0.02 <= t < 2.0 for t in times)


def test_setup_is_outside_the_timed_region():
    times = repeat_times(lambda: None, 2, setup=lambda: time.sleep(0.3))
    assert all(t < 0.3 for t in times)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_stays_as_the_caller_has_it(enabled):
    seen = []
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        repeat_times(lambda: seen.append(gc.isenabled()), 3, warmup=1)
        after = gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
    assert seen == [enabled] * 4
    assert after == enabled


def fixed_times(module, monkeypatch, times):
    """Replace `module`'s repeat_times by one that records its counts, runs the timed call once and
    returns `times`."""
    asked = []

    def fake(fn, reps, warmup=0, setup=None):
        asked.append((reps, warmup))
        if setup is not None:
            setup()
        fn()
        return list(times)

    monkeypatch.setattr(module, "repeat_times", fake)
    return asked


def test_peak_flops_is_the_best_of_its_repetitions(monkeypatch):
    asked = fixed_times(flops, monkeypatch, [2.0, 0.5, 4.0])
    rate = flops.measure_matmul_flops(torch.device("cpu"), "fp32", n=8, iters=3)
    assert rate == 2 * 8**3 / 0.5
    assert asked == [(3, 3)]


def test_peak_flops_measures_a_real_gemm():
    rate = flops.measure_matmul_flops(torch.device("cpu"), "fp32", n=64, iters=2)
    assert 1e5 < rate < 1e15


def test_copy_bandwidth_is_the_best_rep_and_keeps_every_rep(monkeypatch):
    asked = fixed_times(common, monkeypatch, [2.0, 1.0, 3.0])
    bandwidth, times = common.copy_bandwidth(torch.device("cpu"), 1000, reps=3)
    assert bandwidth == 2 * 1000 / 1.0
    assert times == [2.0, 1.0, 3.0]
    assert asked == [(3, 2)]


def test_decode_timings_are_medians(monkeypatch):
    asked = fixed_times(decode, monkeypatch, [3.0, 1.0, 2.0, 10.0])
    assert decode.timed(lambda: None, reps=4) == 2.5
    assert decode.timed(lambda: None, reps=4, warmup=False) == 2.5
    assert asked == [(4, 1), (4, 0)]


def test_a_training_window_is_one_timed_call_per_step_count(monkeypatch):
    asked = fixed_times(bench_train, monkeypatch, [6.0])
    ran = []
    trainer = SimpleNamespace(train_steps=lambda steps, batches=None: ran.append(steps))
    assert bench_train.timed_steps(trainer, 3) == 2.0
    assert asked == [(1, 0)]
    assert ran == [3]
