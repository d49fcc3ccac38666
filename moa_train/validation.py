"""Validation of a composed config: the one-line ConfigError, the checks every key uses (`check`,
`one_of`, `positive_or_null`, ...), the checks common to every task (`validate`), the run folder's
and the memory checks.

Hydra's structured configs (moa_train.schema) refuse a misspelt key or a value of the wrong type at
composition; `validate` then checks what types cannot express (shapes that do not fit, values out
of range) before any work starts. A variant's and a task's config class check their own keys with
the helpers below. This module imports neither torch nor the models.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A user-caused config problem: printed as one line (no traceback) by the entry point."""


def check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def one_of(value: Any, key: str, allowed: tuple) -> None:
    check(value in allowed, key, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


# trial divisions at most (~0.05 s): the divisors of any number are found at once
DIVISOR_TRIALS = 10**6
# divisors an error line lists at each end
DIVISORS_SHOWN = 12


def divisors(n: int) -> str:
    """The divisors of n for an error message: the smallest and the largest DIVISORS_SHOWN and how
    many more, found by trial division up to sqrt(n) (each small one gives its large partner) in
    at most DIVISOR_TRIALS divisions; above DIVISOR_TRIALS**2 the line says which were not
    searched."""
    small = [i for i in range(1, min(math.isqrt(n), DIVISOR_TRIALS) + 1) if n % i == 0]
    large = [n // i for i in reversed(small) if n // i != i]
    searched = math.isqrt(n) <= DIVISOR_TRIALS
    if searched and len(small) + len(large) <= 2 * DIVISORS_SHOWN:
        return ", ".join(map(str, small + large))
    more = len(small) + len(large) - 2 * DIVISORS_SHOWN
    middle = (
        f"... ({more} more) ..."
        if searched
        else f"... (any between {DIVISOR_TRIALS:,} and {n // DIVISOR_TRIALS:,} not searched) ..."
    )
    return ", ".join(
        [*map(str, small[:DIVISORS_SHOWN]), middle, *map(str, large[-DIVISORS_SHOWN:])]
    )


DURATION = re.compile(r"(\d+):(\d+):(\d+):(\d+)")


def check_experts(m) -> None:
    """model.n_experts and model.top_k positive, and top_k <= n_experts (a variant that picks
    top_k of n_experts experts)."""
    for key in ("n_experts", "top_k"):
        check(m[key] > 0, f"model.{key}", f"must be a positive integer, got {m[key]}")
    check(
        m.top_k <= m.n_experts,
        "model.top_k",
        f"{m.top_k} is larger than model.n_experts={m.n_experts}; valid: 1..{m.n_experts}",
    )


def parse_duration(value: Any, key: str = "trainer.max_time") -> float | None:
    """Seconds of a duration given as a number of seconds or "DD:HH:MM:SS" (as Lightning's
    max_time); None for null. ConfigError naming `key` otherwise."""
    if value is None:
        return None
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if (parts := DURATION.fullmatch(text)) is not None:
            days, hours, minutes, secs = map(int, parts.groups())
            seconds = float(((days * 24 + hours) * 60 + minutes) * 60 + secs)
        else:
            with contextlib.suppress(ValueError):
                seconds = float(text)
    check(
        seconds is not None and math.isfinite(seconds) and seconds > 0,
        key,
        f"got {value!r}; allowed: null, a positive number of seconds (5400) or DD:HH:MM:SS "
        '("00:01:30:00")',
    )
    return seconds


def positive_or_null(value: Any, key: str) -> None:
    check(value is None or value > 0, key, f"must be positive or null, got {value}")


def leaves(node: Any, key: str = ""):
    """(dotted key, value) of every leaf of a plain config tree (OmegaConf.to_container), list items
    included (optim.betas.1); `key` prefixes every key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, f"{key}.{i}")
    else:
        yield key, node


# the largest BPE vocabulary trained (the largest in use are ~2**18)
MAX_BPE_VOCAB = 2**24
# the largest integer a key may hold: torch, NumPy and the data loaders take 64-bit integers, and
# the memory check's arithmetic stays finite
MAX_INT = 2**63 - 1


def check_numbers(cfg) -> None:
    """Every float key finite: inf passes a check like `lr > 0` and nan makes every comparison
    false, and either turns all weights into NaN at the first step. Every integer key within 64
    bits: a larger one overflows (a traceback) wherever it meets torch, NumPy or a float."""
    for top in cfg:
        if top != "hydra":
            tree = (
                OmegaConf.to_container(cfg[top], resolve=True)
                if OmegaConf.is_config(cfg[top])
                else cfg[top]
            )
            for key, value in leaves(tree, str(top)):
                check(
                    not isinstance(value, float) or math.isfinite(value),
                    key,
                    f"must be a finite number, got {value}",
                )
                if isinstance(value, int) and abs(value) > MAX_INT:
                    raise ConfigError(
                        f"{key}: must be within +-{MAX_INT:,} (a 64-bit integer), got a number of "
                        f"{len(str(abs(value)))} digits"
                    )


def check_writable(path, key: str) -> None:
    """ConfigError naming `key` unless `path` is, or can be created as, a writable folder. Judged by
    its nearest existing ancestor, so nothing is created here (the run folder's name may hold a time
    stamp)."""
    folder = Path(os.path.expanduser(str(path))).absolute()
    while not folder.exists():
        folder = folder.parent
    check(
        folder.is_dir(), key, f"cannot create {path}: {folder} is a file; choose a writable folder"
    )
    check(
        os.access(folder, os.W_OK | os.X_OK),
        key,
        f"cannot write into {folder}; choose a writable folder",
    )


def writable_file(path: Path, key: str, what: str) -> None:
    if path.exists() or path.is_symlink():
        check(
            path.is_file(), key, f"{path} ({what}) is not a file; remove it or choose another {key}"
        )
        check(
            os.access(path, os.W_OK),
            key,
            f"cannot write {path} ({what}); fix its permissions or choose another {key}",
        )


def check_run_folder(run_dir, cfg, log_name: str = "train.log", key: str = "hydra.run.dir") -> None:
    """ConfigError unless what a run writes into `run_dir` can be written: its log, metrics.jsonl,
    the TensorBoard folder and the checkpoint files. Checked before the first step (a run folder
    reused from an earlier run, or damaged by hand, failed at the first log or save step, with a
    traceback)."""
    run_dir = Path(os.path.expanduser(str(run_dir)))
    check_writable(run_dir, key)
    writable_file(run_dir / log_name, key, "the run's log")
    writable_file(run_dir / "metrics.jsonl", key, "the metrics record")
    tensorboard = cfg.logger.tensorboard
    if tensorboard is not None:
        check_writable(run_dir / tensorboard.log_dir, "logger.tensorboard.log_dir")
    checkpoints = run_dir / "checkpoints"
    check_writable(checkpoints, key)
    if checkpoints.is_dir():
        for path in (*checkpoints.glob("step_*.pt*"), *checkpoints.glob("best.pt*")):
            check(
                not path.is_dir(),
                key,
                f"{path} is a folder where a checkpoint file belongs; remove it or "
                f"choose another {key}",
            )


def validate(cfg, variants) -> None:
    """Raise ConfigError naming the key and what would be valid: the checks common to every task
    (each task adds its own and the memory check: moa_train.train.tasks.validate runs them all).
    `variants`: the variant table's name -> config class (moa_train.models.variants.VARIANTS)."""
    from moa_train.schema import TASK_CONFIGS, TrainConfig

    known = {f.name for f in fields(TrainConfig)} | {"hydra"}
    for key in cfg:
        check(
            key in known,
            str(key),
            f"unknown top-level key; allowed: {', '.join(sorted(known - {'hydra'}))}",
        )
    model, trainer, optim, schedule, data = (
        cfg.model,
        cfg.trainer,
        cfg.optim,
        cfg.schedule,
        cfg.data,
    )
    check_numbers(cfg)
    one_of(cfg.task.name, "task", tuple(TASK_CONFIGS))
    check(
        cfg.task.name in data.tasks,
        "task",
        f"{cfg.task.name} does not fit data={data.name} (it feeds: {', '.join(data.tasks)}); use "
        f"task={' or task='.join(data.tasks)} or leave task out",
    )
    check(
        isinstance(cfg.task, TASK_CONFIGS[cfg.task.name])
        or issubclass(OmegaConf.get_type(cfg.task), TASK_CONFIGS[cfg.task.name]),
        "task.name",
        f"{cfg.task.name} is chosen by the task group: task={cfg.task.name}, not "
        f"task.name={cfg.task.name}",
    )
    one_of(model.name, "model.name", tuple(sorted(variants)))
    variant = variants[model.name]
    check(
        issubclass(OmegaConf.get_type(model), variant),
        "model.name",
        f"{model.name} is chosen by the model group: model={model.name}, not "
        f"model.name={model.name}",
    )
    variant.validate(model, cfg)

    one_of(data.tokenizer, "data.tokenizer", ("char", "word", "bpe", "random"))
    if data.tokenizer == "random":
        check(
            data.name == "random_tokens",
            "data.tokenizer",
            "random goes with data=random_tokens only",
        )
        check(
            data.vocab_size is not None and 1 < data.vocab_size <= 2**31,
            "data.vocab_size",
            f"random_tokens needs a vocabulary size in 2..{2**31:,} (int32 ids), got "
            f"{data.vocab_size}",
        )
    one_of(data.split, "data.split", ("official", "moas_paper"))
    if data.tokenizer == "bpe":
        # the BPE trainer reserves memory for the whole vocabulary up front (~70 bytes an entry)
        # and aborts the process where it cannot
        check(
            data.vocab_size is not None and 260 <= data.vocab_size <= MAX_BPE_VOCAB,
            "data.vocab_size",
            f"BPE needs a vocabulary size >= 260 and <= {MAX_BPE_VOCAB:,}, got {data.vocab_size}",
        )
    if data.root is not None:
        # data=text reads data.root itself (MOA_DATA_DIR is the folder of the named corpora)
        where = (
            "give the folder holding train.txt, valid.txt, test.txt"
            if data.name == "text"
            else "point data.root or MOA_DATA_DIR at the folder holding wikitext-2/"
        )
        check(
            Path(os.path.expanduser(data.root)).is_dir(),
            "data.root",
            f"folder {data.root!r} does not exist; {where}",
        )
    check_writable(data.cache_dir, "data.cache_dir")

    one_of(trainer.device, "trainer.device", ("auto", "cpu", "cuda"))
    one_of(trainer.precision, "trainer.precision", ("fp32", "bf16"))
    one_of(
        trainer.sdpa_backend,
        "trainer.sdpa_backend",
        ("auto", "flash", "cudnn", "efficient", "math"),
    )
    for key in (
        "max_steps",
        "batch_size",
        "block_size",
        "grad_accum",
        "eval_interval",
        "log_interval",
    ):
        check(trainer[key] > 0, f"trainer.{key}", f"must be a positive integer, got {trainer[key]}")
    one_of(trainer.strategy, "trainer.strategy", ("ddp", "fsdp"))
    one_of(trainer.grad_accum_norm, "trainer.grad_accum_norm", ("mean", "tokens"))
    check(
        trainer.ddp_bucket_mb > 0,
        "trainer.ddp_bucket_mb",
        f"must be > 0 (MiB; PyTorch's default 25), got {trainer.ddp_bucket_mb}",
    )
    for key in ("eval_iters", "eval_batch_size", "grad_clip", "save_interval"):
        positive_or_null(trainer[key], f"trainer.{key}")
    check(
        trainer.keep_checkpoints >= 1,
        "trainer.keep_checkpoints",
        f"must be >= 1, got {trainer.keep_checkpoints}",
    )
    check(
        0 <= trainer.seed < 2**32,
        "trainer.seed",
        f"must be in 0..{2**32 - 1} (NumPy's seed range), got {trainer.seed}",
    )
    check_backend(trainer.compile_backend)
    check(
        trainer.max_bad_steps >= 1,
        "trainer.max_bad_steps",
        f"must be >= 1, got {trainer.max_bad_steps}",
    )
    parse_duration(trainer.max_time)
    stopping = trainer.early_stopping
    check(
        stopping.patience is None or stopping.patience >= 0,
        "trainer.early_stopping.patience",
        f"must be a number of validations >= 0 (null or 0 = off), got {stopping.patience}",
    )
    check(
        stopping.min_delta >= 0,
        "trainer.early_stopping.min_delta",
        f"must be >= 0, got {stopping.min_delta}",
    )
    check(
        not (trainer.cuda_graphs and not optim.fused),
        "optim.fused",
        "false cannot skip a non-finite step inside a CUDA graph (trainer.cuda_graphs=true); use "
        "true",
    )
    resume = trainer.resume
    check(
        isinstance(resume, bool) or resume in ("auto", "true", "false") or isinstance(resume, str),
        "trainer.resume",
        f"got {resume!r}; allowed: auto, true, false or a path",
    )
    if isinstance(resume, str) and resume not in ("auto", "true", "false"):
        check(
            Path(os.path.expanduser(resume)).exists(),
            "trainer.resume",
            f"{resume!r} does not exist; allowed: auto, true, false or the path of a checkpoint or "
            "run folder",
        )
    if trainer.eval_only:
        check(
            resume not in (False, "false", None),
            "trainer.eval_only",
            "needs trainer.resume=PATH (a checkpoint or run folder) or auto/true with a checkpoint "
            "in the run folder",
        )

    one_of(optim.name, "optim.name", ("adamw",))
    check(optim.lr > 0, "optim.lr", f"must be positive, got {optim.lr}")
    check(
        len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
        "optim.betas",
        f"must be two numbers in [0, 1), got {list(optim.betas)}",
    )
    check(
        optim.weight_decay >= 0 and optim.router_weight_decay >= 0,
        "optim.weight_decay",
        "must be >= 0",
    )
    check(
        optim.router_lr_mult > 0,
        "optim.router_lr_mult",
        f"must be positive, got {optim.router_lr_mult}",
    )
    check(optim.eps > 0, "optim.eps", f"must be positive, got {optim.eps}")
    one_of(schedule.name, "schedule.name", ("constant", "cosine", "inverse_sqrt"))
    check(
        schedule.warmup_steps >= 0,
        "schedule.warmup_steps",
        f"must be >= 0, got {schedule.warmup_steps}",
    )
    check(
        0.0 <= schedule.min_lr_ratio <= 1.0,
        "schedule.min_lr_ratio",
        f"must be in [0, 1], got {schedule.min_lr_ratio}",
    )
    check_name(cfg.experiment_name)
    positive_or_null(cfg.task.average_last, "task.average_last")
    if cfg.logger.wandb is not None:
        one_of(
            cfg.logger.wandb.mode, "logger.wandb.mode", ("auto", "online", "offline", "disabled")
        )
        # wandb is an extra: without it the sink would fail only once the run folder exists
        check(
            importlib.util.find_spec("wandb") is not None,
            "logger=wandb",
            "the wandb package is not installed; install the [wandb] extra: pip install -e "
            "'.[wandb]'",
        )


def check_name(name: str) -> None:
    """experiment_name is a folder under outputs/: a `..` or an absolute path would write outside
    it, and a character that does not print (a newline) would hide in its name."""
    check(
        str(name).isprintable(),
        "experiment_name",
        f"{name!r} holds a character that does not print; allowed: letters, digits, - _ . /",
    )
    parts = Path(str(name)).parts
    check(
        bool(str(name).strip()) and ".." not in parts and not Path(str(name)).is_absolute(),
        "experiment_name",
        f"{name!r} would name a folder outside outputs/; allowed: a relative name without '..' "
        "(letters, digits, - _ . /)",
    )


def check_backend(backend) -> None:
    if backend is None:
        return
    import torch._dynamo  # only when a backend is named: the import takes a moment

    allowed = sorted(b for b in torch._dynamo.list_backends(exclude_tags=()) if "TESTING" not in b)
    one_of(backend, "trainer.compile_backend", ("null (the default)", *allowed))


def device_memory(device: str) -> tuple:
    """(bytes, what they are) of the device a run would use: a GPU's total memory, else the
    machine's RAM."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0))
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "machine's RAM"


@dataclass(frozen=True)
class StepSize:
    """How a task sizes its optimizer step, for the memory checks: the key that sets it, the sizes
    as the user set them, what to lower, the tokens of one global step and the layers each token
    passes through."""

    key: str
    text: str
    lower: str
    tokens: int
    layers: int


class SizePart(NamedTuple):
    """A part of a model's memory, from its config alone (nothing built, no data read), for the
    memory check: the key that sets it, the sizes as the user set them, its trained parameters
    (fp32 weight, gradient and two AdamW moments: 16 bytes each) and its fp32 elements that are not
    trained (a sinusoidal position table)."""

    key: str
    text: str
    params: int
    fixed: int = 0

    def bytes(self, shards: int = 1) -> float:
        """Its bytes on one rank when the trained state is sharded over `shards` ranks (FSDP)."""
        return 16 * self.params / shards + 4 * self.fixed


def activation_bytes(cfg, tokens: float, layers: int = 0) -> float:
    """Activations of `tokens` tokens. With `layers`: those kept for the backward through them, the
    q/k/v/out projections' and the MLP's outputs per token and layer; without: the most a forward
    without backward holds at once, the residual stream beside the MLP's hidden layer. Attention
    scores, dropout masks and the allocator's slack are left out (a lower bound)."""
    m = cfg.model
    per_token = (
        (4 + 2 * m.mlp_ratio) * m.d_model * layers if layers else (1 + m.mlp_ratio) * m.d_model
    )
    return (2 if cfg.trainer.precision == "bf16" else 4) * tokens * per_token


def check_memory(
    cfg, model: tuple, size: StepSize, world_size: int = 1, evaluation: StepSize | None = None
) -> None:
    """Refuse sizes that cannot fit the device before anything is allocated (a huge model or batch
    would otherwise thrash, or fail mid-allocation with a traceback). `model`: the task's SizeParts;
    `size`: its optimizer step, split over trainer.grad_accum micro-batches and `world_size` ranks;
    `evaluation`: an evaluation batch of every rank (a forward without backward). Lower bounds all,
    so a run refused here cannot fit."""
    total, where = device_memory(cfg.trainer.device)
    shards = world_size if cfg.trainer.strategy == "fsdp" else 1
    weights = sum(part.bytes(shards) for part in model)

    def gib(n: float) -> str:
        return f"{n / 2**30:,.0f} GiB"

    if weights > total:
        part = max(model, key=lambda p: p.bytes(shards))
        raise ConfigError(
            f"{part.key}: {part.text} needs at least {gib(part.bytes(shards))} for weights and "
            f"optimizer state (the whole model {gib(weights)}), more than the {where} "
            f"({gib(total)})"
        )
    t = cfg.trainer
    train = weights + activation_bytes(cfg, size.tokens / (t.grad_accum * world_size), size.layers)
    check(
        train <= total,
        size.key,
        f"{size.text} over trainer.grad_accum={t.grad_accum} micro-batches needs at least "
        f"{gib(train)}, more than the {where} ({gib(total)}); lower it or raise "
        "trainer.grad_accum",
    )
    if evaluation is not None:
        need = weights + activation_bytes(cfg, evaluation.tokens)
        check(
            need <= total,
            evaluation.key,
            f"{evaluation.text} needs at least {gib(need)} to evaluate, more than the {where} "
            f"({gib(total)}); lower {evaluation.lower}",
        )


# the names these helpers had when they were private to moa_train.config (plugins import them)
_check = check
_one_of = one_of
_positive_or_null = positive_or_null
_divisors = divisors
