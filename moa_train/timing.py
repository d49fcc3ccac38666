"""Seconds of repeated calls, for the benchmarks and the peak-FLOPs measurement.

The clock is torch.utils.benchmark's (the one its Timer reads: it synchronises the accelerator
before each reading, so queued kernels are inside the time measured); the loop is the standard
library's timeit.Timer.repeat, which torch's Timer also runs on. Timer's own entry points do not fit
the measurements here: timeit(n) adds max(n // 100, 2) untimed calls of its own and returns one
total (no time per repetition, so no min, median or spread over repetitions), blocked_autorange
picks its own count, and both set the thread count (one thread by default). triton.testing.do_bench
picks its count from a time budget and needs a GPU.
"""

from __future__ import annotations

import gc
import timeit
from collections.abc import Callable


def repeat_times(
    fn: Callable[[], object],
    reps: int,
    warmup: int = 0,
    setup: Callable[[], object] | None = None,
) -> list[float]:
    """Seconds of each of `reps` calls of fn(), after `warmup` untimed calls (setup() before each,
    untimed too). The accelerator is synchronised before and after each timed call; the garbage
    collector is left as the caller has it (timeit would switch it off while timing)."""
    from torch.utils.benchmark import timer as synced_clock

    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    collect = gc.isenabled()

    def before() -> None:
        if collect:
            gc.enable()
        if setup is not None:
            setup()

    return timeit.Timer(fn, setup=before, timer=synced_clock).repeat(repeat=reps, number=1)
