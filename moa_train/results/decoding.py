"""Translation decoding with and without the KV cache, on trained checkpoints: the test set's
hypotheses, BLEU and decoding time each way, in fp32 and in the run's precision, written to
docs/results/translation_decoding.json (the translation driver's `--tables-only` puts its table into
docs/results/translation.md).

    # runs with checkpoints (train them first)
    python3 scripts/time_translation_decoding.py RUN_DIR [RUN_DIR ...]
    python3 scripts/time_translation_decoding.py RUN_DIR --max-sentences 200 --precisions fp32

Each run's latest checkpoint is decoded with its own eval settings (beam, lenpen, length limits).
Times are device-synchronised wall times of the test-set decoding alone (no loss pass, no scoring).
The arguments are checked first (one `error:` line, exit 2, nothing written); the record is written
once every run is decoded, by temp-and-rename.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from contextlib import nullcontext
from pathlib import Path

from moa_train.errors import Parser, fail
from moa_train.paths import repo_root
from moa_train.results import check_writable, comma_list, positive_int, write_text
from moa_train.tables import table_lines

ROOT = repo_root()
OUT = ROOT / "docs/results/translation_decoding.json"


def decode_run(
    run: Path, precisions: list, max_sentences: int | None, device: str, cudnn: bool = False
) -> list:
    """Rows of (precision, cache) for `run`; with `cudnn`, the bf16 rows once more with cuDNN
    attention allowed (decoding excludes it: models/kv_cache.DECODING_SDPA says why), to show what
    allowing it costs."""
    import torch
    from omegaconf import OmegaConf

    import moa_train
    from moa_train.models import kv_cache
    from moa_train.train.tasks import TranslationTask, first_pairs

    model, cfg = moa_train.load_run(run, map_location=device)
    rows = []
    for precision in precisions:
        cfg_p = OmegaConf.merge(cfg, {"trainer": {"device": device}})
        task = TranslationTask(cfg_p, torch.device(device))
        task.model = model
        data = task.data.splits["test"]
        if max_sentences is not None and max_sentences < len(data):
            data = first_pairs(data, max_sentences)
        dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
        autocast = (
            (lambda dtype=dtype: torch.autocast(device_type=device, dtype=dtype))
            if dtype
            else nullcontext
        )
        plain = kv_cache.DECODING_SDPA
        try:
            for allow_cudnn in (False, True) if cudnn and precision == "bf16" else (False,):
                kv_cache.DECODING_SDPA = plain + (
                    [kv_cache.SDPBackend.CUDNN_ATTENTION] if allow_cudnn else []
                )
                pair = time_both(task, data, cfg.task.beam, precision, device, autocast, run)
                rows += [{**row, "cudnn_attention": allow_cudnn} for row in pair]
        finally:
            kv_cache.DECODING_SDPA = plain
    return rows


def time_both(task, data, beam: int, precision: str, device: str, autocast, run: Path) -> list:
    """The test set decoded without and with the KV cache: two rows (seconds, BLEU, identical
    hypotheses)."""
    import torch

    from moa_train.metrics.bleu import corpus_scores

    hyps, rows = {}, []
    for cache in (False, True):
        task.cfg.task.kv_cache = cache
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        hyps[cache] = task._decode(data, f"test, cache={cache}, {precision}", beam, autocast)
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append(
            {
                "run": str(run),
                "precision": precision,
                "kv_cache": cache,
                "beam": beam,
                "sentences": len(data.src),
                "seconds": time.perf_counter() - start,
                "bleu": corpus_scores(hyps[cache], data.tgt_text)["bleu"],
            }
        )
    same = sum(a == b for a, b in zip(hyps[False], hyps[True], strict=True))
    return [{**row, "identical_hypotheses": same} for row in rows]


HEADER = (
    "run",
    "precision",
    "cuDNN attention",
    "sentences",
    "beam",
    "seconds, no cache",
    "seconds, cache",
    "speed-up",
    "BLEU, no cache",
    "BLEU, cache",
    "identical",
)


def markdown_section(record: dict) -> list:
    """The table that translation.md shows (its driver calls this when the json exists)."""
    m = record["meta"]
    lines = [
        "## Test-set decoding with and without the KV cache",
        "",
        f"- Command: `{m['command']}`",
        f"- Device: {m['device']}; torch {m['torch']}; git {m['git_sha']}; date {m['date']}",
        (
            "- Seconds: device-synchronised wall time of decoding the test set alone (beam search "
            "with the run's beam and length penalty). Identical: hypotheses equal, word for word, "
            "with and without the cache."
        ),
        (
            "- cuDNN attention: `off` is how decoding runs (models/kv_cache.DECODING_SDPA); "
            "`allowed` (rows from `--with-cudnn`) is how it ran before that: torch's default SDPA "
            "choice, cuDNN for bf16 on Hopper, which builds a new cuDNN graph for each new shape."
        ),
        "",
    ]
    if m.get("note"):
        lines[4:4] = [f"- Note: {m['note']}"]
    rows = record["rows"]
    table = [
        [
            Path(off["run"]).name,
            off["precision"],
            "allowed" if off.get("cudnn_attention") else "off",
            off["sentences"],
            off["beam"],
            f"{off['seconds']:.1f}",
            f"{on['seconds']:.1f}",
            f"{off['seconds'] / on['seconds']:.1f}x",
            f"{off['bleu']:.2f}",
            f"{on['bleu']:.2f}",
            f"{on['identical_hypotheses']} / {on['sentences']}",
        ]
        for off, on in zip(rows[0::2], rows[1::2], strict=True)
    ]
    return [*lines, *table_lines(HEADER, table, "lllrrrrrrrr"), "", *agreement(rows), ""]


def agreement(rows: list) -> list:
    """Per precision, how far cached decoding strays from uncached: identical hypotheses and the
    largest BLEU gap."""
    out = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        pairs = [
            (off, on)
            for off, on in zip(rows[0::2], rows[1::2], strict=True)
            if off["precision"] == precision
        ]
        same, total = (
            sum(on["identical_hypotheses"] for _, on in pairs),
            sum(on["sentences"] for _, on in pairs),
        )
        gap = max(abs(on["bleu"] - off["bleu"]) for off, on in pairs)
        out.append(
            f"- {precision}: {same} of {total} hypotheses identical with and without the cache "
            f"over the {len(pairs)} decodings above; largest BLEU difference {gap:.2f}."
        )
    return out


def check_run(run: Path) -> None:
    """Refuse (one line) a run that is not a translation run holding a checkpoint."""
    import yaml

    from moa_train.train.checkpoint import checkpoints_in
    from moa_train.train.tasks import saved_task

    if not checkpoints_in(run):
        fail(
            f"{run}: no checkpoint (checkpoints/step_*.pt); give translation run folders that "
            "hold checkpoints"
        )
    saved = run / ".hydra" / "config.yaml"
    task = saved_task(yaml.safe_load(saved.read_text())) if saved.is_file() else "translation"
    if task != "translation":
        fail(f"{run}: a {task} run; decoding times need translation runs")


def main(argv=None) -> None:
    import torch

    from moa_train.train.loop import git_sha

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="translation run folders holding checkpoints"
    )
    parser.add_argument(
        "--precisions",
        type=comma_list(("fp32", "bf16")),
        default=["fp32", "bf16"],
        help="comma list of fp32, bf16",
    )
    parser.add_argument(
        "--max-sentences",
        type=positive_int,
        default=None,
        help="the first N test sentences (default: all)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--note",
        default=None,
        help="a sentence for the record (e.g. where the checkpoints came from)",
    )
    parser.add_argument(
        "--with-cudnn",
        action="store_true",
        help="time bf16 decoding once more with cuDNN attention allowed (as before it was "
        "excluded)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device: cuda, but torch sees no GPU; use --device cpu")
    for run in args.runs:
        check_run(run)
    check_writable(out=args.out.parent)
    rows = [
        row
        for run in args.runs
        for row in decode_run(
            run, args.precisions, args.max_sentences, args.device, args.with_cudnn
        )
    ]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    meta = {
        "command": "python3 scripts/time_translation_decoding.py "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "device": device,
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "date": dt.date.today().isoformat(),
        "note": args.note,
    }
    record = {"meta": meta, "rows": rows}
    write_text(args.out, json.dumps(record, indent=1))
    print("\n".join(markdown_section(record)))


if __name__ == "__main__":
    main()
