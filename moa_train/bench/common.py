"""What the training benchmark (train.py) and the inference benchmark (decode.py) both use: the
model sizes and the config composed for them, device sync, memory release between models, where
results go (--out / --publish), the contention check (a busy machine's figures flagged), quiet
profiling, the results file, table cells."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

from moa_train.config import applicable
from moa_train.paths import config_dir, repo_root
from moa_train.tables import table_lines
from moa_train.timing import repeat_times

log = logging.getLogger(__name__)

# table1 rows reuse the MoAS Table 1 experiment of their name where there is one, the others take
# its sizes via mha's
TABLE1 = config_dir() / "experiment" / "moas_table1"

# sizes: (overrides, default batch). Fast mode everywhere: bf16, TF32, compile, whole-step CUDA
# graph.
SIZES = {
    "table1": (["data=wikitext2_char", "mode=fast"], 12),
    "gpt2": (
        [
            "~experiment",
            "data=random_tokens",
            "mode=fast",
            "model.n_layer=12",
            "model.d_model=768",
            "model.n_head=12",
            "model.max_seq_len=1024",
            "trainer.block_size=1024",
            "model.dropout=0.0",
            # each model takes the keys it owns (registry.applicable)
            "model.gate_dropout=0.0",
        ],
        64,
    ),
    # for CI on a CPU: seconds per model; a variant's own tiny sizes from
    # configs/debug_model/tiny_<model>.yaml
    "tiny": (
        [
            "~experiment",
            "debug=tiny",
            "data=random_tokens",
            "data.vocab_size=256",
            "model.n_layer=2",
            "model.d_model=64",
            "model.n_head=4",
            "model.max_seq_len=64",
            "trainer.block_size=64",
        ],
        4,
    ),
}
ALWAYS = [
    "trainer.max_steps=1000000",
    "trainer.eval_interval=1000000",
    "trainer.log_interval=1000000",
    "trainer.resume=false",
]
# CPU: the plain step
CPU = ["trainer.precision=fp32", "trainer.compile=false", "trainer.cuda_graphs=false"]


def compose_cfg(size: str, model: str, batch: int, device: torch.device, extra: list = ()):
    from moa_train.config import compose_train
    from moa_train.train.tasks import validate

    overrides = [*applicable(model, SIZES[size][0]), f"model={model}"]
    if size == "table1":
        row = model if (TABLE1 / f"{model}.yaml").is_file() else "mha"
        overrides.insert(0, f"experiment=moas_table1/{row}")
    overrides += ALWAYS + [f"trainer.batch_size={batch}", f"trainer.device={device.type}", *extra]
    if device.type == "cpu":
        overrides += CPU
    cfg = compose_train(overrides)
    validate(cfg)
    return cfg, overrides


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free a finished (or failed) model's memory and compiled graphs before the next one is built:
    the trainer holds a reference to itself (its compiled bound method), so only a collection frees
    it."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}, "results": {}}


# --- where results go -----------------------------------------------------------------------------

# a run's own results, relative to the working directory (as Hydra's outputs/); git-ignored
DEFAULT_OUT = Path("outputs") / "bench"


def published() -> Path:
    """The committed results folder of the checkout (docs/results/), where --publish writes."""
    return repo_root() / "docs" / "results"


def add_out_args(parser, files: str) -> None:
    """--out and --publish (one or the other) on a benchmark's parser; `out_dir` resolves them."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--out",
        default=None,
        help=f"folder of {files} (default: {DEFAULT_OUT}/ under the working directory)",
    )
    group.add_argument(
        "--publish",
        action="store_true",
        help=f"write into the checkout's published results ({published()}) instead",
    )


def out_dir(args) -> Path:
    if args.publish:
        return published()
    return Path(args.out) if args.out else DEFAULT_OUT


# --- contention: figures measured on a busy machine -----------------------------------------------

# copy bandwidth (read + write bytes/s of a device-to-device copy) below which a card of the class
# is taken as busy: about half of what an idle one measures (the copy bandwidth column of the runs
# tables in docs/results/inference.md). First match in the device's name wins.
BANDWIDTH_FLOORS = (("H200", 2.0e12), ("H100", 1.5e12), ("A100", 0.8e12))
# max / min of a figure's timed windows (or repetitions) above which they disagree too much to be
# one quiet measurement; a CPU's short timings scatter more than a GPU's
SPREAD_LIMITS = {"cuda": 1.3, "cpu": 2.0}
# a later copy probe of the same run slower than the first by more than this factor
DROP_LIMIT = 1.5
# a trace's kernel (or op) time may exceed the measured step by this share before the negative
# gap counts: profiling adds its own overhead to each op
GAP_TOLERANCE = 0.25
# a CPU run starting with a 1-minute load average above this many runnable threads per core
LOAD_LIMIT = 1.5


def bandwidth_floor(device_name: str) -> tuple | None:
    """(class, floor in bytes/s) of a device whose idle copy bandwidth is known, else None."""
    return next(((c, f) for c, f in BANDWIDTH_FLOORS if c in device_name), None)


def contention(
    device_type: str,
    device_name: str,
    *,
    bandwidth: float | None = None,
    first_bandwidth: float | None = None,
    windows: dict | None = None,
    gaps: dict | None = None,
    load: float | None = None,
    cores: int | None = None,
) -> dict:
    """{flagged, reasons}: whether figures were measured on a busy machine, from numbers already
    measured (no timing here). bandwidth: a copy probe (bytes/s), against the device class's floor
    and against the run's first probe; windows: {what: timings of repeated windows}, their max /
    min; gaps: {what: (gap ms, step ms)} of traces, a gap below -GAP_TOLERANCE x the step (kernels
    taking longer than the step they ran in); load: the 1-minute load average against `cores`."""
    reasons = []
    floor = bandwidth_floor(device_name)
    if bandwidth is not None and floor and bandwidth < floor[1]:
        reasons.append(
            f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s, below the {floor[1] / 1e9:,.0f} GB/s of "
            f"an idle {floor[0]}"
        )
    if bandwidth is not None and first_bandwidth and bandwidth * DROP_LIMIT < first_bandwidth:
        reasons.append(
            f"copy bandwidth fell to {bandwidth / 1e9:,.1f} GB/s from {first_bandwidth / 1e9:,.1f} "
            "GB/s at the start of the run"
        )
    limit = SPREAD_LIMITS.get(device_type, SPREAD_LIMITS["cpu"])
    for what, times in (windows or {}).items():
        times = [t for t in times if t is not None]
        if len(times) > 1 and min(times) > 0 and max(times) / min(times) > limit:
            reasons.append(f"{what} spread {max(times) / min(times):.2f}x (max / min > {limit})")
    for what, (gap_ms, step_ms) in (gaps or {}).items():
        if gap_ms < -GAP_TOLERANCE * step_ms:
            reasons.append(
                f"{what}: gaps {gap_ms:.3f} ms in a {step_ms:.3f} ms step (kernels longer than the "
                "step)"
            )
    if load is not None and cores and load > LOAD_LIMIT * cores:
        reasons.append(f"load average {load:.1f} on {cores} cores at the start")
    return {"flagged": bool(reasons), "reasons": reasons}


def merge(*records) -> dict:
    """One contention record from several (a run's, a probe's, a row's): their reasons, once."""
    reasons = list(dict.fromkeys(r for rec in records if rec for r in rec["reasons"]))
    return {"flagged": bool(reasons), "reasons": reasons}


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> tuple:
    """(bytes read + written per second by a device-to-device copy of `nbytes`: the best of `reps`
    (a peak), the seconds of each rep)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = repeat_times(functools.partial(dst.copy_, src), reps, warmup=2)
    del src, dst
    return 2 * nbytes / min(times), times


def probe_bytes(device: torch.device) -> int:
    return 2**30 if device.type == "cuda" else 64 * 2**20


def probe(device: torch.device, first: float | None = None, nbytes: int | None = None) -> tuple:
    """(copy bandwidth, contention record) of a copy probe now: against the device class's floor,
    the spread of its repetitions, and against `first` (the run's first probe) if given; the run's
    first probe on a CPU also reads the load average (later ones would count the benchmark's own
    threads)."""
    from moa_train.metrics.flops import device_name

    bandwidth, times = copy_bandwidth(device, nbytes or probe_bytes(device))
    load = None
    if first is None and device.type == "cpu" and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
    record = contention(
        device.type,
        device_name(device),
        bandwidth=bandwidth,
        first_bandwidth=first,
        windows={"copy probe": times},
        load=load,
        cores=os.cpu_count(),
    )
    return bandwidth, record


def warn(what: str, record: dict | None) -> None:
    """The terminal's line for figures flagged as measured under contention."""
    if record and record["flagged"]:
        log.warning(
            "WARNING: %s measured under contention (a busy machine?): %s",
            what,
            "; ".join(record["reasons"]),
        )


def mark(record: dict | None) -> str:
    """A table cell's marker for a flagged row or run."""
    return " **[contention]**" if record and record["flagged"] else ""


def contention_notes(items) -> list:
    """Markdown lines under a table: the reasons of each flagged (name, record)."""
    flagged = [(name, rec) for name, rec in items if rec and rec["flagged"]]
    if not flagged:
        return []
    out = [
        "",
        "Marked **[contention]**: measured on a busy machine, not comparable; measure again:",
    ]
    return out + [f"- {name}: {'; '.join(rec['reasons'])}" for name, rec in flagged]


def runs_section(runs: dict, header: list, cells) -> list:
    """The Markdown of a benchmark's runs, oldest first: run, device, date, torch, the benchmark's
    own columns (`header`; `cells(run)` gives a run's), the command; then the reasons of those
    flagged as measured under contention."""
    ordered = sorted(runs.items())
    rows = [
        [rid + mark(run.get("contention")), run["device"], run["date"], run["torch"]]
        + [*cells(run), f"`{run['command']}`"]
        for rid, run in ordered
    ]
    return [
        "## Runs",
        "",
        *table_lines(["run", "device", "date", "torch", *header, "command"], rows),
        *contention_notes((f"run {rid}", run.get("contention")) for rid, run in ordered),
    ]


def begin(argv, parse_args, results: str, save) -> tuple:
    """A benchmark's start: its arguments (the process's when `argv` is None), parsed, its output
    folder and the records of its `results` json there, from which `save(records, out)` rebuilds
    the tables at once with --tables-only; log lines go to the terminal."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = out_dir(args)
    records = load(out / results)
    if args.tables_only:
        save(records, out)
    return argv, args, out, records


def warn_flagged(results: dict, run_id: str) -> None:
    """The terminal's closing line when rows of this run were measured under contention."""
    flagged = [k for k, r in results.items() if r["run"] == run_id and r["contention"]["flagged"]]
    if flagged:
        log.warning(
            "WARNING: %d row(s) of this run flagged as measured under contention (%s): measure "
            "again on a quiet machine before comparing or publishing them",
            len(flagged),
            ", ".join(flagged),
        )


# --- profiling ------------------------------------------------------------------------------------


@contextlib.contextmanager
def captured_stderr():
    """Everything written to the process's stderr (file descriptor 2: the profiler's C++ messages
    included) inside the block, kept out of the terminal; yields the list that receives its lines
    on exit."""
    lines: list = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines += tmp.read().decode(errors="replace").splitlines()
