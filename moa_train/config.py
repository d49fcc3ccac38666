"""Config schema (Hydra structured configs) and validation.

The dataclasses below are the schema of `configs/train.yaml`: Hydra merges every group's YAML into them, so a
misspelt key or a value of the wrong type is refused at composition with the key's full name. `validate` then checks
what types cannot express (shapes that do not fit, values out of range) before any work starts.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A user-caused config problem: printed as one line (no traceback) by the entry point."""


@dataclass
class AuxConfig:
    balance_coef: float = 0.01  # weight of the load-balance loss (train/aux/balance)
    z_coef: float = 0.0  # weight of the router z-loss mean(logsumexp(logits)^2) (train/aux/z)
    cv_coef: float = 0.0  # weight of the squared coefficient of variation of expert importance (train/aux/cv)
    layer_reduce: str = "mean"  # how per-layer aux terms combine: mean (MoAS paper) | sum (MoA code)
    balance_type: str = "mse"  # mse: MSE of batch-mean gates to 1/C (MoAS paper) | switch: C*sum_i f_i*P_i


@dataclass
class ModelConfig:
    # attention family, a key of moa_train.models.registry: mha|gqa|mqa|moas_static|moas_dynamic|moa
    name: str = MISSING
    d_model: int = 384
    n_layer: int = 4
    n_head: int = 6  # query heads (mha/gqa/mqa/moas); unused by moa
    n_kv_heads: Optional[int] = None  # K/V heads: null = n_head for mha, 1 for mqa; moa: shared K/V groups (default 1)
    max_seq_len: int = 256  # learned position embeddings
    vocab_size: Optional[int] = None  # null: taken from the data
    dropout: float = 0.1  # embedding, attention-probability, residual and MLP dropout
    bias: bool = False  # bias in Linear and LayerNorm
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * d_model
    # MoAS
    gqa_kv_heads: int = 2  # K/V heads of the GQA branch
    router_hidden: Optional[int] = None  # hidden width of the dynamic router; null = d_model // 4
    gate_dropout: float = 0.0  # dropout on the router's gates after softmax (MoAS paper: 0.1)
    fused: bool = True  # MoAS: one QKV matmul, one SDPA call and one output matmul for all branches
    # MoA
    n_experts: int = 8  # E
    top_k: int = 2  # k experts per token
    head_dim: Optional[int] = None  # expert head size; null = d_model // n_head
    gating: str = "softmax_all"  # softmax_all (released MoA code) | topk_softmax (renormalised over the k)
    expert_matmul: str = "auto"  # dense (all E experts, gather) | grouped (sorted by expert, selected only) | auto
    # encoder-decoder (translation data)
    n_encoder_layer: Optional[int] = None  # null = n_layer (n_layer counts decoder layers)
    norm_first: bool = True  # pre-LN (true) or post-LN (false, the original Transformer)
    positions: str = "learned"  # learned | sinusoidal
    share_embeddings: bool = True  # one embedding for source, target and output (joint vocabulary)
    cross_attention: Optional[str] = None  # attention of decoder cross-attention; null = model.name (mha for moas_*)
    aux: AuxConfig = field(default_factory=AuxConfig)


@dataclass
class DataConfig:
    # wikitext2_char | wikitext2_word | wikitext2_bpe | random_tokens | wmt14_en_de | multi30k_en_de
    name: str = MISSING
    tokenizer: str = "char"  # char | word | bpe | random (random_tokens)
    root: Optional[str] = None  # folder holding wikitext-2/{train,valid,test}.txt; null: download via datasets
    cache_dir: str = "~/.cache/moa_train"  # token ids (memmap) and tokenizers are cached here
    split: str = "official"  # official: the WikiText-2 valid/test files | moas_paper: first 90% / last 10% of train
    # BPE vocabulary size (bpe and translation); random_tokens: ids drawn from 0..vocab_size-1
    vocab_size: Optional[int] = None
    # translation
    src: str = "en"  # source language (file suffix)
    tgt: str = "de"  # target language
    max_tokens: int = 4096  # tokens (source + target, padding included) per optimizer step, global
    max_len: int = 256  # training pairs with a longer side (in BPE tokens) are dropped


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on tensors with dim >= 2 (not norms, biases)
    router_lr_mult: float = 1.0  # router parameters' lr = lr * router_lr_mult
    router_weight_decay: float = 0.1  # router parameters' weight decay (dim >= 2)
    fused: bool = True  # fused AdamW (CPU and CUDA): skips a non-finite step on the device; false: one sync per step


@dataclass
class ScheduleConfig:
    name: str = "constant"  # constant | cosine | inverse_sqrt
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine: final lr = lr * min_lr_ratio


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    tf32: bool = False  # allow TF32 matmuls in fp32
    compile: bool = False  # torch.compile the model
    compile_backend: Optional[str] = None  # null: inductor on CUDA, aot_eager on CPU
    compile_mode: Optional[str] = None  # inductor mode: null | max-autotune | ... (not with cuda_graphs)
    cuda_graphs: bool = False  # capture the whole optimizer step in one CUDA graph (one CUDA process; else eager)
    sdpa_backend: str = "auto"  # CUDA attention kernel: auto (PyTorch picks) | flash | cudnn | efficient | math
    # data parallelism under torchrun: ddp (a model replica per rank) | fsdp (FSDP2 per block: parameters, gradients
    # and optimizer state sharded; decoder-only LMs)
    strategy: str = "ddp"
    # DDP's gradient bucket size in MiB (PyTorch's default 25): larger buckets mean fewer all-reduces (and, under
    # torch.compile, fewer graph pieces: dynamo splits the graph at bucket boundaries) but less overlap with backward
    ddp_bucket_mb: float = 25.0
    max_steps: int = 500
    batch_size: int = 12  # sequences per optimizer step, global: under torchrun each rank takes batch_size / ranks
    block_size: int = 256  # tokens per sequence (<= model.max_seq_len)
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    grad_clip: Optional[float] = None  # max grad norm; null = no clipping
    eval_interval: int = 50
    eval_iters: Optional[int] = 20  # random eval batches; null = a full pass over the split
    eval_batch_size: Optional[int] = None  # null = batch_size
    log_interval: int = 10
    seed: int = 0
    resume: Any = "auto"  # auto | true | false | PATH to a checkpoint or run folder
    eval_only: bool = False  # evaluate the resumed checkpoint on valid and test, no training
    label_smoothing: float = 0.0  # translation: label-smoothed cross-entropy (MoA / Transformer: 0.1)
    keep_checkpoints: int = 1  # last N checkpoints kept (besides best.pt); >= 2: a fallback if the last is damaged
    save_interval: Optional[int] = None  # null = at every evaluation
    # a step with a non-finite loss or gradient is skipped (train/skipped_steps); this many in a row stop the run
    # (checked at log and save steps, so up to log_interval - 1 more skipped steps run first)
    max_bad_steps: int = 10


@dataclass
class EvalConfig:
    """Translation decoding and scoring (sacreBLEU and chrF on detokenised text)."""
    beam: int = 4  # beam size for the final test evaluation (MoA: 4)
    lenpen: float = 0.6  # length penalty: score / len**lenpen (MoA: 0.6)
    val_beam: int = 1  # beam during training's validation; 1 = greedy
    max_len_a: float = 1.2  # output length limit: a * source length + b
    max_len_b: int = 10
    average_last: Optional[int] = None  # average the weights of the last N checkpoints before the test evaluation
    # decode (and score BLEU / chrF on) only the first N sentences of valid and test; null = all. The loss is
    # always over the whole split. For smoke runs: decoding dominates a short translation run on a CPU
    max_sentences: Optional[int] = None


@dataclass
class TensorboardConfig:
    log_dir: str = "tensorboard"  # relative to the run folder


@dataclass
class WandbConfig:
    project: str = "moa_train"
    entity: Optional[str] = None
    group: Optional[str] = None  # null = experiment_name
    name: Optional[str] = None  # null = experiment_name + the job's command-line overrides
    tags: list = field(default_factory=list)  # added to [model.name, data.name]
    # auto (online with WANDB_API_KEY set, else offline: `wandb sync` later) | online | offline | disabled
    mode: str = "auto"


@dataclass
class LoggerConfig:
    tensorboard: Optional[TensorboardConfig] = None
    wandb: Optional[WandbConfig] = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment_name: str = "default"  # names the run folder and dashboards


def compose_train(overrides: list, return_hydra_config: bool = False):
    """`configs/train.yaml` composed with `overrides`, in-process (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    from moa_train.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def register_configs() -> None:
    from moa_train.sweep import register_resolvers

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_resolvers()  # ${moa.sweep_name:}, in train.yaml's hydra.sweep.dir


register_configs()

# --- validation -------------------------------------------------------------------------------------------------

TRANSLATION_DATA = ("wmt14_en_de", "multi30k_en_de")  # data.name values that make a translation run


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def _divisors(n: int) -> str:
    return ", ".join(str(i) for i in range(1, n + 1) if n % i == 0)


def _positive_or_null(value: Any, key: str) -> None:
    _check(value is None or value > 0, key, f"must be positive or null, got {value}")


def _float_leaves(node: Any, key: str):
    """(full key, value) of every float in a config tree, list items included (optim.betas.1)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _float_leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _float_leaves(v, f"{key}.{i}")
    elif isinstance(node, float):
        yield key, node


def _check_finite(cfg) -> None:
    """Every float key finite: inf passes a check like `lr > 0` and nan makes every comparison false, and either
    turns all weights into NaN at the first step."""
    from omegaconf import OmegaConf

    for top in cfg.keys():
        if top != "hydra":
            tree = OmegaConf.to_container(cfg[top], resolve=True) if OmegaConf.is_config(cfg[top]) else cfg[top]
            for key, value in _float_leaves({top: tree}, ""):
                _check(math.isfinite(value), key, f"must be a finite number, got {value}")


def check_writable(path, key: str) -> None:
    """ConfigError naming `key` unless `path` is, or can be created as, a writable folder. Judged by its nearest
    existing ancestor, so nothing is created here (the run folder's name may hold a time stamp)."""
    folder = Path(os.path.expanduser(str(path))).absolute()
    while not folder.exists():
        folder = folder.parent
    _check(folder.is_dir(), key, f"cannot create {path}: {folder} is a file; choose a writable folder")
    _check(os.access(folder, os.W_OK | os.X_OK), key, f"cannot write into {folder}; choose a writable folder")


def _writable_file(path: Path, key: str, what: str) -> None:
    if path.exists() or path.is_symlink():
        _check(path.is_file(), key, f"{path} ({what}) is not a file; remove it or choose another {key}")
        _check(os.access(path, os.W_OK), key, f"cannot write {path} ({what}); fix its permissions or choose "
                                              f"another {key}")


def check_run_folder(run_dir, cfg, log_name: str = "train.log", key: str = "hydra.run.dir") -> None:
    """ConfigError unless what a run writes into `run_dir` can be written: its log, metrics.jsonl, the TensorBoard
    folder and the checkpoint files. Checked before the first step (a run folder reused from an earlier run, or
    damaged by hand, failed at the first log or save step, with a traceback)."""
    run_dir = Path(os.path.expanduser(str(run_dir)))
    check_writable(run_dir, key)
    _writable_file(run_dir / log_name, key, "the run's log")
    _writable_file(run_dir / "metrics.jsonl", key, "the metrics record")
    tensorboard = cfg.logger.tensorboard
    if tensorboard is not None:
        check_writable(run_dir / tensorboard.log_dir, "logger.tensorboard.log_dir")
    checkpoints = run_dir / "checkpoints"
    check_writable(checkpoints, key)
    if checkpoints.is_dir():
        for path in (*checkpoints.glob("step_*.pt*"), *checkpoints.glob("best.pt*")):
            _check(not path.is_dir(), key, f"{path} is a folder where a checkpoint file belongs; remove it or "
                                           f"choose another {key}")


def validate(cfg, world_size: int = 1) -> None:
    """Raise ConfigError naming the key and what would be valid; called before any work. `world_size`: the number
    of torchrun processes the global batch is split over."""
    from moa_train.models.registry import ATTENTION

    known = {f.name for f in fields(TrainConfig)} | {"hydra"}
    for key in cfg.keys():
        _check(key in known, str(key), f"unknown top-level key; allowed: {', '.join(sorted(known - {'hydra'}))}")
    m, t, o, s, d, e = cfg.model, cfg.trainer, cfg.optim, cfg.schedule, cfg.data, cfg.eval
    _check_finite(cfg)
    _one_of(m.name, "model.name", tuple(sorted(ATTENTION)))
    for key in ("d_model", "n_layer", "n_head", "max_seq_len", "n_experts", "top_k", "gqa_kv_heads"):
        _check(m[key] > 0, f"model.{key}", f"must be a positive integer, got {m[key]}")
    if m.name != "moa":
        _check(m.d_model % m.n_head == 0, "model.n_head",
               f"{m.n_head} does not divide model.d_model={m.d_model}; valid: {_divisors(m.d_model)}")
    kv = m.n_kv_heads
    if kv is not None and m.name != "moa":
        _check(kv > 0 and m.n_head % kv == 0, "model.n_kv_heads",
               f"{kv} does not divide model.n_head={m.n_head}; valid: {_divisors(m.n_head)}")
    if m.name.startswith("moas"):
        _check(m.n_head % m.gqa_kv_heads == 0, "model.gqa_kv_heads",
               f"{m.gqa_kv_heads} does not divide model.n_head={m.n_head}; valid: {_divisors(m.n_head)}")
    if m.name == "moa":
        _check(m.top_k <= m.n_experts, "model.top_k",
               f"{m.top_k} is larger than model.n_experts={m.n_experts}; valid: 1..{m.n_experts}")
        _one_of(m.gating, "model.gating", ("softmax_all", "topk_softmax"))
        _one_of(m.expert_matmul, "model.expert_matmul", ("auto", "dense", "grouped"))
        _check(not (m.expert_matmul == "grouped" and t.cuda_graphs and t.precision != "bf16"), "model.expert_matmul",
               "grouped in fp32 runs the reference, which reads group sizes on the host and so cannot be captured "
               "(trainer.cuda_graphs=true); use auto, dense, or trainer.precision=bf16")
        if m.head_dim is None:
            _check(m.d_model % m.n_head == 0, "model.head_dim",
                   f"null needs model.n_head={m.n_head} to divide model.d_model={m.d_model}; set model.head_dim")
    if m.name == "moa" and kv is not None:
        _check(kv > 0, "model.n_kv_heads", f"must be positive or null, got {kv}")
    for key in ("head_dim", "router_hidden", "n_encoder_layer"):
        _positive_or_null(m[key], f"model.{key}")
    _check(math.isfinite(m.mlp_ratio) and m.mlp_ratio * m.d_model >= 1, "model.mlp_ratio",
           f"must be finite and give an MLP of at least 1 unit (mlp_ratio * model.d_model >= 1), got {m.mlp_ratio}")
    for key in ("dropout", "gate_dropout"):
        _check(0.0 <= m[key] < 1.0, f"model.{key}", f"must be in [0, 1), got {m[key]}")
    for key in ("balance_coef", "z_coef", "cv_coef"):
        _check(m.aux[key] >= 0, f"model.aux.{key}", f"must be >= 0, got {m.aux[key]}")
    _one_of(m.aux.layer_reduce, "model.aux.layer_reduce", ("mean", "sum"))
    _one_of(m.aux.balance_type, "model.aux.balance_type", ("mse", "switch"))
    _one_of(m.positions, "model.positions", ("learned", "sinusoidal"))
    if m.vocab_size is not None:
        _check(m.vocab_size > 0, "model.vocab_size", f"must be positive or null, got {m.vocab_size}")

    _one_of(d.tokenizer, "data.tokenizer", ("char", "word", "bpe", "random"))
    if d.tokenizer == "random":
        _check(d.name == "random_tokens", "data.tokenizer", "random goes with data=random_tokens only")
        _check(d.vocab_size is not None and d.vocab_size > 1, "data.vocab_size",
               f"random_tokens needs a vocabulary size > 1, got {d.vocab_size}")
    _one_of(d.split, "data.split", ("official", "moas_paper"))
    if d.tokenizer == "bpe":
        _check(d.vocab_size is not None and d.vocab_size >= 260, "data.vocab_size",
               f"BPE needs a vocabulary size >= 260, got {d.vocab_size}")
    if d.root is not None:
        _check(Path(os.path.expanduser(d.root)).is_dir(), "data.root",
               f"folder {d.root!r} does not exist; point data.root or MOA_DATA_DIR at the folder holding wikitext-2/")
    check_writable(d.cache_dir, "data.cache_dir")

    _one_of(t.device, "trainer.device", ("auto", "cpu", "cuda"))
    _one_of(t.precision, "trainer.precision", ("fp32", "bf16"))
    _one_of(t.sdpa_backend, "trainer.sdpa_backend", ("auto", "flash", "cudnn", "efficient", "math"))
    for key in ("max_steps", "batch_size", "block_size", "grad_accum", "eval_interval", "log_interval"):
        _check(t[key] > 0, f"trainer.{key}", f"must be a positive integer, got {t[key]}")
    if d.name in TRANSLATION_DATA:
        _check(d.max_tokens > 0, "data.max_tokens", f"must be a positive integer, got {d.max_tokens}")
        _check(1 <= d.max_len < m.max_seq_len, "data.max_len",
               f"{d.max_len} does not leave room for BOS/EOS in model.max_seq_len={m.max_seq_len}; "
               f"valid: 1..{m.max_seq_len - 1}")
        cross = m.cross_attention or m.name
        _check(not cross.startswith("moas"), "model.cross_attention",
               f"{cross} is a self-attention scheme; allowed for cross-attention: mha, gqa, mqa, moa")
    else:
        _check(t.block_size <= m.max_seq_len, "trainer.block_size",
               f"{t.block_size} exceeds model.max_seq_len={m.max_seq_len}; valid: 1..{m.max_seq_len}")
    if d.name not in TRANSLATION_DATA:  # translation batches by data.max_tokens
        _check(t.batch_size % t.grad_accum == 0, "trainer.grad_accum",
               f"{t.grad_accum} does not divide trainer.batch_size={t.batch_size}; valid: {_divisors(t.batch_size)}")
        slices = world_size * t.grad_accum
        _check(world_size == 1 or t.batch_size % slices == 0, "trainer.batch_size",
               f"{t.batch_size} sequences do not split over {world_size} ranks x trainer.grad_accum={t.grad_accum} "
               f"micro-batches; valid: multiples of {slices}")
    _one_of(t.strategy, "trainer.strategy", ("ddp", "fsdp"))
    _check(t.strategy == "ddp" or d.name not in TRANSLATION_DATA, "trainer.strategy",
           "fsdp shards decoder-only LMs; translation runs use ddp")
    _check(t.ddp_bucket_mb > 0, "trainer.ddp_bucket_mb",
           f"must be > 0 (MiB; PyTorch's default 25), got {t.ddp_bucket_mb}")
    for key in ("eval_iters", "eval_batch_size", "grad_clip", "save_interval"):
        _positive_or_null(t[key], f"trainer.{key}")
    _check(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    _check(0 <= t.seed < 2 ** 32, "trainer.seed", f"must be in 0..{2 ** 32 - 1} (NumPy's seed range), got {t.seed}")
    _check_backend(t.compile_backend)
    _check(t.max_bad_steps >= 1, "trainer.max_bad_steps", f"must be >= 1, got {t.max_bad_steps}")
    _check(0.0 <= t.label_smoothing < 1.0, "trainer.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    _check(not (t.cuda_graphs and not o.fused), "optim.fused",
           "false cannot skip a non-finite step inside a CUDA graph (trainer.cuda_graphs=true); use true")
    resume = t.resume
    _check(isinstance(resume, bool) or resume in ("auto", "true", "false") or isinstance(resume, str),
           "trainer.resume", f"got {resume!r}; allowed: auto, true, false or a path")
    if isinstance(resume, str) and resume not in ("auto", "true", "false"):
        _check(Path(os.path.expanduser(resume)).exists(), "trainer.resume",
               f"{resume!r} does not exist; allowed: auto, true, false or the path of a checkpoint or run folder")
    if t.eval_only:
        _check(resume not in (False, "false", None), "trainer.eval_only",
               "needs trainer.resume=PATH (a checkpoint or run folder) or auto/true with a checkpoint in the run "
               "folder")

    _one_of(o.name, "optim.name", ("adamw",))
    _check(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
           f"must be two numbers in [0, 1), got {list(o.betas)}")
    _check(o.weight_decay >= 0 and o.router_weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.router_lr_mult > 0, "optim.router_lr_mult", f"must be positive, got {o.router_lr_mult}")
    _check(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    _one_of(s.name, "schedule.name", ("constant", "cosine", "inverse_sqrt"))
    _check(s.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    _check(0.0 <= s.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", f"must be in [0, 1], got {s.min_lr_ratio}")
    _positive_or_null(e.average_last, "eval.average_last")
    _check_eval(e)
    _check_name(cfg.experiment_name)
    _positive_or_null(e.max_sentences, "eval.max_sentences")
    if cfg.logger.wandb is not None:
        _one_of(cfg.logger.wandb.mode, "logger.wandb.mode", ("auto", "online", "offline", "disabled"))
        # wandb is an extra: without it the sink would fail only once the run folder exists
        _check(importlib.util.find_spec("wandb") is not None, "logger=wandb",
               "the wandb package is not installed; install the [wandb] extra: pip install -e '.[wandb]'")
    check_memory(cfg, world_size)


MAX_BEAM = 64  # a beam keeps beam x vocabulary scores per sentence; beyond this it only costs memory (fairseq: 5)


def _check_eval(e) -> None:
    for key in ("beam", "val_beam"):
        _check(1 <= e[key] <= MAX_BEAM, f"eval.{key}", f"must be in 1..{MAX_BEAM}, got {e[key]}")
    _check(math.isfinite(e.lenpen), "eval.lenpen", f"must be a finite number (MoA: 0.6), got {e.lenpen}")
    _check(math.isfinite(e.max_len_a) and e.max_len_a >= 0, "eval.max_len_a",
           f"must be a finite number >= 0 (MoA: 1.2), got {e.max_len_a}")
    _check(e.max_len_b >= 0, "eval.max_len_b", f"must be >= 0 (MoA: 10), got {e.max_len_b}")


def _check_name(name: str) -> None:
    """experiment_name is a folder under outputs/: a `..` or an absolute path would write outside it."""
    parts = Path(str(name)).parts
    _check(bool(str(name).strip()) and ".." not in parts and not Path(str(name)).is_absolute(), "experiment_name",
           f"{name!r} would name a folder outside outputs/; allowed: a relative name without '..' (letters, digits, "
           "- _ . /)")


def _check_backend(backend) -> None:
    if backend is None:
        return
    import torch._dynamo  # only when a backend is named: the import takes a moment

    allowed = sorted(b for b in torch._dynamo.list_backends(exclude_tags=()) if "TESTING" not in b)
    _one_of(backend, "trainer.compile_backend", ("null (the default)", *allowed))


def device_memory(device: str) -> tuple:
    """(bytes, what they are) of the device a run would use: a GPU's total memory, else the machine's RAM."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0))
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "machine's RAM"


def min_train_bytes(cfg, world_size: int = 1) -> tuple:
    """A lower bound of a rank's training memory: (fp32 weights + gradient + 2 AdamW moments, activations kept for
    the backward of one micro-batch). It leaves out embeddings, attention scores, dropout masks and the allocator's
    slack, so a run refused by it cannot fit."""
    m, t = cfg.model, cfg.trainer
    translation = cfg.data.name in TRANSLATION_DATA
    layers = m.n_layer + ((m.n_encoder_layer or m.n_layer) if translation else 0)
    per_layer = (4 + 2 * m.mlp_ratio) * m.d_model  # q/k/v/out projections and the MLP, per token (or per d_model)
    tokens = (cfg.data.max_tokens if translation else t.batch_size * t.block_size) / (t.grad_accum * world_size)
    act_bytes = 2 if t.precision == "bf16" else 4
    return 16 * layers * per_layer * m.d_model, act_bytes * tokens * layers * per_layer


def check_memory(cfg, world_size: int = 1) -> None:
    """Refuse sizes that cannot fit the device before anything is allocated (a huge batch would otherwise thrash
    or be killed mid-allocation)."""
    weights, activations = min_train_bytes(cfg, world_size)
    total, where = device_memory(cfg.trainer.device)
    gib = 2 ** 30
    _check(weights <= total, "model.d_model",
           f"model.d_model={cfg.model.d_model} x model.n_layer={cfg.model.n_layer} needs at least "
           f"{weights / gib:,.0f} GiB for weights and optimizer state, more than the {where} ({total / gib:,.0f} GiB)")
    t = cfg.trainer
    sizes = (f"data.max_tokens={cfg.data.max_tokens}" if cfg.data.name in TRANSLATION_DATA
             else f"trainer.batch_size={t.batch_size} x trainer.block_size={t.block_size}")
    _check(weights + activations <= total, sizes.partition("=")[0],
           f"{sizes} over trainer.grad_accum={t.grad_accum} micro-batches needs at least "
           f"{(weights + activations) / gib:,.0f} GiB, more than the {where} ({total / gib:,.0f} GiB); lower it or "
           "raise trainer.grad_accum")
