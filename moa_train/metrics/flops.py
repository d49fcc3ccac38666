"""Peak matmul throughput of this device, measured once and cached, for MFU.

MFU = (model FLOPs per token, from the models' own counter) x tokens/s / peak of the run's
precision: bf16 -> a bf16 GEMM, fp32 with TF32 allowed -> a TF32 GEMM, plain fp32 -> an fp32 GEMM.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from moa_train.io import atomic_write_text
from moa_train.timing import repeat_times

log = logging.getLogger(__name__)


def peak_kind(precision: str, tf32: bool) -> str:
    return "bf16" if precision == "bf16" else ("tf32" if tf32 else "fp32")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} threads: {torch.get_num_threads()})"


def measure_matmul_flops(
    device: torch.device, kind: str, n: int | None = None, iters: int = 10
) -> float:
    """FLOP/s of an n x n x n GEMM in `kind` precision: the best of `iters` timed runs after warm-up
    (a peak: a run slowed by other work on the machine must not lower it, or MFU would read above
    100%)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    # leaves the global RNG (dropout, init) untouched
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
    try:
        times = repeat_times(lambda: a @ b, iters, warmup=3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * n**3 / min(times)


def peak_cache() -> Path:
    """The file of measured peaks: $MOA_PEAK_FLOPS_FILE, else moa_train_peak_flops.json in the
    user's cache folder ($XDG_CACHE_HOME, else ~/.cache), beside the data cache and not in it (a
    property of the device, not of any data)."""
    if path := os.environ.get("MOA_PEAK_FLOPS_FILE"):
        return Path(os.path.expanduser(path))
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(os.path.expanduser(cache)) / "moa_train_peak_flops.json"


def peak_flops(device: torch.device, kind: str, path: Path | None = None) -> float:
    """Measured peak for (device, kind, torch version): measured the first time it is asked for,
    then read from `path` (default: peak_cache()); delete the file, or its entry, to measure
    again."""
    path = peak_cache() if path is None else Path(path)
    key = f"{device_name(device)}|{kind}|torch {torch.__version__}"
    table = read_table(path)
    if not _is_rate(table.get(key)):
        table[key] = measure_matmul_flops(device, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(table, indent=1))
    return table[key]


def _is_rate(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def read_table(path: Path) -> dict:
    """The cached peaks; a garbled file (a crash mid-write by an older version, a hand edit) is
    measured again, with one warning line, rather than stopping the run."""
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        table = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    if not isinstance(table, dict):
        log.warning("peak FLOP/s cache %s is damaged (%s); measuring again", path, str(table)[:80])
        return {}
    return table
