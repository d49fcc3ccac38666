"""Config schema (Hydra structured configs) and validation.

The dataclasses below are the schema of `configs/train.yaml`: Hydra merges every group's YAML into
them, so a misspelt key or a value of the wrong type is refused at composition with the key's full
name. `validate` then checks what types cannot express (shapes that do not fit, values out of range)
before any work starts.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError

from moa_train.config_format import CONFIG_FORMAT
from moa_train.paths import config_dir


class ConfigError(ValueError):
    """A user-caused config problem: printed as one line (no traceback) by the entry point."""


@dataclass
class AuxConfig:
    balance_coef: float = 0.01  # weight of the load-balance loss (train/aux/balance)
    z_coef: float = 0.0  # weight of the router z-loss mean(logsumexp(logits)^2) (train/aux/z)
    # weight of the squared coefficient of variation of expert importance (train/aux/cv)
    cv_coef: float = 0.0
    # weight of the KV budget loss relu(stored heads per token - model.kv_budget)^2 (moas_kv;
    # train/aux/kv_budget)
    kv_budget_coef: float = 0.0
    # how per-layer aux terms combine: mean (MoAS paper) | sum (MoA code)
    layer_reduce: str = "mean"
    # mse: MSE of batch-mean gates to 1/C (MoAS paper) | switch: C*sum_i f_i*P_i, f_i the share of
    # selections (summing to 1) | switch_k: k times switch, f_i the share of tokens (summing to k;
    # the MoH code's)
    balance_type: str = "mse"
    # tokens the z-loss averages over: real (padding left out) | all (the MoA code: pads too)
    z_tokens: str = "real"
    # cv of the dense router probabilities | gates: of the top-k gate matrix (the MoA code)
    cv_of: str = "probs"
    # true: the weighted aux terms are divided by the micro-batch's target-token count, as in the
    # MoA code (added to the token-SUMMED NLL, which fairseq divides by the tokens): a coefficient
    # then acts as coef / tokens per batch
    divide_by_tokens: bool = False


@dataclass
class ModelConfig:
    """The keys every model has. An attention variant's own keys come from its config class (in its
    module under models/attention/), a subclass of this one and the schema of its
    configs/model/<name>.yaml: a key of another variant is refused at composition."""

    # attention variant, a name in VARIANTS (moa_train.models.registry registers them)
    name: str = MISSING
    d_model: int = 384
    n_layer: int = 4
    n_head: int = 6  # query heads (moa: only defaults head_dim = d_model // n_head)
    max_seq_len: int = 256  # learned position embeddings
    vocab_size: int | None = None  # null: taken from the data
    dropout: float = 0.1  # embedding, attention-probability, residual and MLP dropout
    attn_dropout: float | None = None  # dropout on attention probabilities; null = model.dropout
    activation: str = "gelu"  # MLP activation: gelu (GPT-2) | relu (the Transformer, fairseq)
    # dropout after the MLP activation (fairseq's activation dropout)
    activation_dropout: float = 0.0
    # the decoder's MLP activation dropout (encoder-decoder); null = model.activation_dropout. The
    # MoA code's decoder layer applies --activation-dropout (run.sh: 0.1), its encoder --dropout
    decoder_activation_dropout: float | None = None
    bias: bool = False  # bias in Linear and LayerNorm
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * d_model
    # encoder-decoder (translation data)
    n_encoder_layer: int | None = None  # null = n_layer (n_layer counts decoder layers)
    norm_first: bool = True  # pre-LN (true) or post-LN (false, the original Transformer)
    # learned | sinusoidal (interleaved sin/cos from position 0) | sinusoidal_fairseq (fairseq's
    # table: [sin | cos] concatenated, frequencies 10000^(-i / (half - 1)), positions counted from
    # padding_idx + 1 = 2) | rope (rotary on Q and K inside attention, no position table:
    # models/rope.py)
    positions: str = "learned"
    rope_fraction: float = 1.0  # rope: fraction of each head's channels rotated, in (0, 1]
    rope_base: float = 10000.0  # rope: base of the rotary frequencies base^(-2i / rotated channels)
    # encoder-decoder init: standard (Xavier-uniform linear layers) | fairseq (each module as
    # fairseq initialises it: Q/K/V Xavier with gain 1/sqrt(2), MoA experts one by one, the FFN with
    # PyTorch's default); the LM: GPT-2's
    init: str = "standard"
    share_embeddings: bool = True  # one embedding for source, target and output (joint vocabulary)
    # encoder-decoder padding: kept (pad positions carry their embeddings and attend like real
    # tokens; nothing real ever reads them) | zeroed (fairseq and the MoA code: a pad position's
    # input is zero and its attention output is zero, as the MoA layer routes no expert for a pad
    # query), which decides what pads give model.aux.z_tokens=all
    pad_positions: str = "kept"
    # decoder cross-attention: `name` (null = the model's own variant with its keys, or the
    # variant's cross_default) plus that variant's own keys (+model.cross.n_experts=4); the model's
    # common keys apply to it too
    cross: dict[str, Any] = field(default_factory=lambda: {"name": None})
    aux: AuxConfig = field(default_factory=AuxConfig)

    # false: a self-attention scheme, refused as model.cross.name
    cross_attention_ok: ClassVar[bool] = True
    # the cross-attention when model.cross.name is null; None: itself
    cross_default: ClassVar[str | None] = None
    # false: the variant cannot rotate its queries and keys (model.positions=rope is refused)
    rope_ok: ClassVar[bool] = True
    # true: the variant's attention is defined with rotary positions (mla): any other is refused
    rope_required: ClassVar[bool] = False

    @classmethod
    def validate(cls, m, cfg) -> None:
        """ConfigError naming the key and what is allowed. A variant adds its own checks and calls
        this one."""
        for key in ("d_model", "n_layer", "n_head", "max_seq_len"):
            _check(m[key] > 0, f"model.{key}", f"must be a positive integer, got {m[key]}")
        _positive_or_null(m.n_encoder_layer, "model.n_encoder_layer")
        _check(
            math.isfinite(m.mlp_ratio) and m.mlp_ratio * m.d_model >= 1,
            "model.mlp_ratio",
            "must be finite and give an MLP of at least 1 unit (mlp_ratio * model.d_model >= 1), "
            f"got {m.mlp_ratio}",
        )
        for key in ("dropout", "activation_dropout", "decoder_activation_dropout", "attn_dropout"):
            if m[key] is not None:  # (null: another key's value)
                _check(0.0 <= m[key] < 1.0, f"model.{key}", f"must be in [0, 1), got {m[key]}")
        _one_of(m.activation, "model.activation", ("gelu", "relu"))
        _one_of(m.init, "model.init", ("standard", "fairseq"))
        _one_of(m.pad_positions, "model.pad_positions", ("kept", "zeroed"))
        _one_of(m.aux.z_tokens, "model.aux.z_tokens", ("real", "all"))
        _one_of(m.aux.cv_of, "model.aux.cv_of", ("probs", "gates"))
        for key in ("balance_coef", "z_coef", "cv_coef", "kv_budget_coef"):
            _check(m.aux[key] >= 0, f"model.aux.{key}", f"must be >= 0, got {m.aux[key]}")
        _one_of(m.aux.layer_reduce, "model.aux.layer_reduce", ("mean", "sum"))
        _one_of(m.aux.balance_type, "model.aux.balance_type", ("mse", "switch", "switch_k"))
        _one_of(
            m.positions, "model.positions", ("learned", "sinusoidal", "sinusoidal_fairseq", "rope")
        )
        _check(
            m.positions != "rope" or cls.rope_ok,
            "model.positions",
            f"model={m.name} does not take rope; allowed: learned, sinusoidal, sinusoidal_fairseq",
        )
        _check(
            m.positions == "rope" or not cls.rope_required,
            "model.positions",
            f"model={m.name} is defined with rotary positions: needs rope, got {m.positions!r}",
        )
        _check(
            0.0 < m.rope_fraction <= 1.0,
            "model.rope_fraction",
            f"must be in (0, 1], got {m.rope_fraction}",
        )
        _check(m.rope_base > 1.0, "model.rope_base", f"must be > 1, got {m.rope_base}")
        if m.vocab_size is not None:
            _check(
                m.vocab_size > 0,
                "model.vocab_size",
                f"must be positive or null, got {m.vocab_size}",
            )

    @classmethod
    def attention_params(cls, m) -> int:
        """The parameters of one attention module of this variant built from `m`, for the memory
        check: computed from the config alone (nothing is built, so a huge value costs nothing).
        Each variant counts its own (tests compare them with the modules); a variant that does not
        is counted without its attention, which keeps the check a lower bound."""
        return 0

    @staticmethod
    def attn_p(m) -> float:
        """The attention-probability dropout: model.attn_dropout, or model.dropout where that is
        null."""
        return m.dropout if m.attn_dropout is None else m.attn_dropout

    @classmethod
    def check_heads(cls, m) -> None:
        """model.n_head divides model.d_model (every head has d_model / n_head dimensions)."""
        _check(
            m.d_model % m.n_head == 0,
            "model.n_head",
            f"{m.n_head} does not divide model.d_model={m.d_model}; valid: {_divisors(m.d_model)}",
        )


# attention variant name -> its config class (a ModelConfig subclass); filled by register_variant
VARIANTS: dict = {}
# preset name -> YAML path, for variants registered from outside the package
PLUGIN_PRESETS: dict = {}


def register_variant(name: str, config: type, yaml: str | Path | None = None) -> None:
    """Make `config` the schema of variant `name`: its YAMLs name it as `_schema_<name>` in their
    defaults. `yaml`: a preset from outside configs/model/ (a plugin's), choosable as
    model=<name>."""
    VARIANTS[name] = config
    ConfigStore.instance().store(group="model", name=f"_schema_{name}", node=config)
    if yaml is not None:
        ConfigStore.instance().store(group="model", name=name, node=OmegaConf.load(yaml))
        PLUGIN_PRESETS[name] = Path(yaml)


def presets() -> list:
    """Every choice of the model group: configs/model/*.yaml (variants and their named presets) and
    plugins'."""
    return sorted(
        {p.stem for p in config_dir().joinpath("model").glob("*.yaml")} | set(PLUGIN_PRESETS)
    )


def bench_presets() -> list:
    """The model choices in registration order, a variant with named presets represented by them
    (moa by moa_dense and moa_sparse): moa-bench's rows."""
    choices = presets()
    built_on = {preset_variant(p) for p in choices if preset_variant(p) != p}
    return [
        p for name in VARIANTS for p in choices if preset_variant(p) == name and p not in built_on
    ]


def preset_variant(preset: str) -> str:
    """The variant a preset configures: its `name`, or that of the first preset in its defaults."""
    path = PLUGIN_PRESETS.get(preset, config_dir() / "model" / f"{preset}.yaml")
    node = OmegaConf.load(path)
    if "name" in node:
        return node.name
    return preset_variant(next(d for d in node.defaults if not str(d).startswith("_")))


def applicable(preset: str, overrides) -> list:
    """`overrides` less those of model keys that only other variants own: one list of settings for
    every model (moa-bench's GPT-2 size: model.gate_dropout=0.0 applies to the variants that have a
    gate dropout)."""
    foreign = set().union(*map(variant_keys, VARIANTS.values())) - variant_keys(
        VARIANTS[preset_variant(preset)]
    )
    return [
        o for o in overrides if not (o.startswith("model.") and o[6:].partition("=")[0] in foreign)
    ]


def variant_keys(config: type) -> set:
    """The keys of a model config class (the common ones included)."""
    return {f.name for f in fields(config)}


def owners(key: str) -> list:
    """The variants whose config class has `key`."""
    return [name for name, config in VARIANTS.items() if key in variant_keys(config)]


def _with_presets(name: str) -> str:
    named = [p for p in presets() if p != name and preset_variant(p) == name]
    return f"{name} (and its presets {', '.join(named)})" if named else name


def foreign_key(key: str, config: type) -> str:
    """The one line for a model key that variant config `config` does not have: the variants (and
    their presets) that own it."""
    mine = "/".join(name for name, c in VARIANTS.items() if c is config) or config.__name__
    found = [_with_presets(name) for name in owners(key.rpartition(".")[2])]
    if not found:
        allowed = sorted(variant_keys(config))
        near = difflib.get_close_matches(key.rpartition(".")[2], allowed, n=1, cutoff=0.75)
        hint = f"did you mean model.{near[0]}? " if near else ""
        return f"{key}: not a key of {mine}; {hint}allowed: {', '.join(allowed)}"
    return f"{key}: belongs to {', '.join(found)}, not {mine}"


def variant_config(node, lenient: bool = False):
    """`node` (a model or cross-attention config: a dict or DictConfig holding `name`) typed by its
    variant's config class. lenient: keys the variant does not own are dropped (configs saved before
    variants owned their keys held every variant's keys), and the old `cross_attention` becomes
    `cross.name`."""
    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    _one_of(data.get("name"), "model.name", tuple(sorted(VARIANTS)))
    config = VARIANTS[data["name"]]
    if lenient:
        if "cross_attention" in data:
            data["cross"] = {"name": data.pop("cross_attention")}
        data = {k: v for k, v in data.items() if k in variant_keys(config)}
    try:
        return OmegaConf.merge(OmegaConf.structured(config), data)
    except ConfigKeyError as exc:
        raise ConfigError(foreign_key(f"model.{exc.key}", config)) from None


def cross_config(m):
    """The typed config of the decoder's cross-attention: model.cross.name's variant (null: the
    model's own, or its cross_default) with the model's common keys and model.cross's keys."""
    own = OmegaConf.get_type(m)
    name = m.cross.name or own.cross_default
    if name is None:
        return m
    common = {f.name: m[f.name] for f in fields(ModelConfig) if f.name not in ("name", "cross")}
    return variant_config({**common, **OmegaConf.to_container(m.cross, resolve=True), "name": name})


@dataclass
class DataConfig:
    # wikitext2_char | wikitext2_word | wikitext2_bpe | wikitext103_word | wikitext103_bpe | text
    # | random_tokens | wmt14_en_de
    # | multi30k_en_de | a corpus of yours
    name: str = MISSING
    # the tasks this data can feed (configs/task/); its YAML picks the default among them with
    # `override /task@_global_.task: <task>` in its defaults
    tasks: list = field(default_factory=lambda: ["lm"])
    tokenizer: str = "char"  # char | word | bpe | random (random_tokens)
    # the data folder, holding wikitext-2/{train,valid,test}.txt, ...; null: the one recorded with
    # `python3 -m moa_train.data --set-root DIR`, else ../shared/data beside the checkout, else a
    # download via datasets (moa_train/data/root.py). data=text: the folder of train/valid/test.txt
    root: str | None = None
    cache_dir: str = "~/.cache/moa_train"  # token ids (memmap) and tokenizers are cached here
    # official: the WikiText-2 valid/test files | moas_paper: first 90% / last 10% of train
    split: str = "official"
    # BPE vocabulary size (bpe and translation); random_tokens: ids drawn from 0..vocab_size-1
    vocab_size: int | None = None
    # char vocabularies: true adds an <unk> id for characters of valid/test (and prompts) that the
    # train file lacks; false refuses them, naming the first. Word vocabularies always hold <unk>.
    unk: bool = False


@dataclass
class TaskConfig:
    """The keys every task has. A task's own keys come from its config class (beside its module
    under train/, registered with the task: moa_train.train.task_registry), a subclass of this one
    and the schema of its configs/task/<name>.yaml: a key of another task is refused at
    composition, naming the task that owns it."""

    # lm | translation | mlm | a plugin's (moa_train.train.task_registry); default: the data's
    name: str = MISSING
    # test on the average of the weights of the last N checkpoints; null = the current weights
    average_last: int | None = None


# task name -> its config class (a TaskConfig subclass); filled by register_task_config
TASK_CONFIGS: dict = {}


def register_task_config(name: str, config: type, yaml: str | Path | None = None) -> None:
    """Make `config` the schema of task `name`: its YAML names it as `_schema_<name>` in its
    defaults. `yaml`: a task YAML from outside configs/task/ (a plugin's), choosable as
    task=<name>."""
    TASK_CONFIGS[name] = config
    ConfigStore.instance().store(group="task", name=f"_schema_{name}", node=config)
    if yaml is not None:
        ConfigStore.instance().store(group="task", name=name, node=OmegaConf.load(yaml))


def task_owners(key: str) -> list:
    """The tasks whose config class has `key`."""
    return [name for name, config in TASK_CONFIGS.items() if key in variant_keys(config)]


def foreign_task_key(key: str, config: type) -> str:
    """The one line for a task key that task config `config` does not have: the task that owns
    it, or the keys allowed."""
    mine = "/".join(name for name, c in TASK_CONFIGS.items() if c is config) or config.__name__
    found = task_owners(key.rpartition(".")[2])
    if not found:
        allowed = ", ".join(sorted(variant_keys(config)))
        return f"{key}: not a key of task {mine}; allowed: {allowed}"
    return f"{key}: belongs to task {', '.join(found)}, not {mine} (task={found[0]} to use it)"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on tensors with dim >= 2 (not norms, biases)
    router_lr_mult: float = 1.0  # router parameters' lr = lr * router_lr_mult
    router_weight_decay: float = 0.1  # router parameters' weight decay (dim >= 2)
    # fused AdamW (CPU and CUDA): skips a non-finite step on the device; false: one sync per step
    fused: bool = True


@dataclass
class ScheduleConfig:
    name: str = "constant"  # constant | cosine | inverse_sqrt
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine: final lr = lr * min_lr_ratio


@dataclass
class EarlyStoppingConfig:
    """Stop a run whose validation metric (the task's: val/loss) has stopped improving."""

    # stop after this many validations in a row that do not lower the metric below its best by more
    # than min_delta; null or 0 = off
    patience: int | None = None
    min_delta: float = 0.0  # the smallest fall of the metric that counts as an improvement


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    tf32: bool = False  # allow TF32 matmuls in fp32
    compile: bool = False  # torch.compile the model
    compile_backend: str | None = None  # null: inductor on CUDA, aot_eager on CPU
    # inductor mode: null | max-autotune | ... (not with cuda_graphs)
    compile_mode: str | None = None
    # capture the whole optimizer step in one CUDA graph (one CUDA process; else eager)
    cuda_graphs: bool = False
    # CUDA attention kernel: auto (PyTorch picks) | flash | cudnn | efficient | math
    sdpa_backend: str = "auto"
    # data parallelism under torchrun: ddp (a model replica per rank) | fsdp (FSDP2 per block:
    # parameters, gradients and optimizer state sharded; decoder-only LMs)
    strategy: str = "ddp"
    # DDP's gradient bucket size in MiB (PyTorch's default 25): larger buckets mean fewer
    # all-reduces (and, under torch.compile, fewer graph pieces: dynamo splits the graph at bucket
    # boundaries) but less overlap with backward
    ddp_bucket_mb: float = 25.0
    max_steps: int = 500
    # sequences per optimizer step, global: under torchrun each rank takes batch_size / ranks
    batch_size: int = 12
    block_size: int = 256  # tokens per sequence (<= model.max_seq_len)
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    # how the micro-batches' losses make the step's: mean (each micro-batch's per-token loss
    # weighted equally) | tokens (fairseq: the summed losses over the step's target tokens, so each
    # micro-batch weighs by its tokens; equal for equal micro-batches)
    grad_accum_norm: str = "mean"
    # random training windows may start at the last offset, len - block_size - 1 (nanoGPT's and
    # the MoAS code's get_batch); false: one offset fewer, the draws of the runs before this key
    sample_last_window: bool = False
    grad_clip: float | None = None  # max grad norm; null = no clipping
    eval_interval: int = 50
    eval_iters: int | None = 20  # random eval batches; null = a full pass over the split
    eval_batch_size: int | None = None  # null = batch_size
    log_interval: int = 10
    seed: int = 0
    resume: Any = "auto"  # auto | true | false | PATH to a checkpoint or run folder
    eval_only: bool = False  # evaluate the resumed checkpoint on valid and test, no training
    # last N checkpoints kept (besides best.pt); >= 2: a fallback if the last is damaged
    keep_checkpoints: int = 1
    save_interval: int | None = None  # null = at every evaluation
    # a step with a non-finite loss or gradient is skipped (train/skipped_steps); this many in a row
    # stop the run (checked at log and save steps, so up to log_interval - 1 more skipped steps run
    # first)
    max_bad_steps: int = 10
    # this process's wall-clock limit: a checkpoint is written and the run stops (resumable) after
    # the first step past it; seconds (5400) or "DD:HH:MM:SS" ("00:01:30:00"); null = no limit
    max_time: Any = None
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class TensorboardConfig:
    log_dir: str = "tensorboard"  # relative to the run folder


@dataclass
class WandbConfig:
    project: str = "moa_train"
    entity: str | None = None
    group: str | None = None  # null = experiment_name
    name: str | None = None  # null = experiment_name + the job's command-line overrides
    tags: list = field(default_factory=list)  # added to [model.name, data.name]
    # auto (online with WANDB_API_KEY set, else offline: `wandb sync` later) | online | offline |
    # disabled
    mode: str = "auto"


@dataclass
class LoggerConfig:
    tensorboard: TensorboardConfig | None = None
    wandb: WandbConfig | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment_name: str = "default"  # names the run folder and dashboards
    # the layout of this config (moa_train/config_format.py upgrades older saved ones)
    config_format: int = CONFIG_FORMAT
    # the folder of runs/<experiment_name>/ and multiruns/ (hydra.run.dir, hydra.sweep.dir);
    # debug=tiny: outputs/debug, so that smoke runs never land beside real ones
    outputs_dir: str = "outputs"


def compose_train(overrides: list, return_hydra_config: bool = False):
    """`configs/train.yaml` composed with `overrides`, in-process (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def register_configs() -> None:
    from moa_train.sweep import register_resolvers

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_resolvers()  # ${moa.sweep_name:}, in train.yaml's hydra.sweep.dir


register_configs()

# --- validation -----------------------------------------------------------------------------------


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


# trial divisions at most (~0.05 s): the divisors of any number are found at once
DIVISOR_TRIALS = 10**6
# divisors an error line lists at each end
DIVISORS_SHOWN = 12


def _divisors(n: int) -> str:
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
    _check(
        seconds is not None and math.isfinite(seconds) and seconds > 0,
        key,
        f"got {value!r}; allowed: null, a positive number of seconds (5400) or DD:HH:MM:SS "
        '("00:01:30:00")',
    )
    return seconds


def _positive_or_null(value: Any, key: str) -> None:
    _check(value is None or value > 0, key, f"must be positive or null, got {value}")


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


def _check_numbers(cfg) -> None:
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
                _check(
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
    _check(
        folder.is_dir(), key, f"cannot create {path}: {folder} is a file; choose a writable folder"
    )
    _check(
        os.access(folder, os.W_OK | os.X_OK),
        key,
        f"cannot write into {folder}; choose a writable folder",
    )


def _writable_file(path: Path, key: str, what: str) -> None:
    if path.exists() or path.is_symlink():
        _check(
            path.is_file(), key, f"{path} ({what}) is not a file; remove it or choose another {key}"
        )
        _check(
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
    _writable_file(run_dir / log_name, key, "the run's log")
    _writable_file(run_dir / "metrics.jsonl", key, "the metrics record")
    tensorboard = cfg.logger.tensorboard
    if tensorboard is not None:
        check_writable(run_dir / tensorboard.log_dir, "logger.tensorboard.log_dir")
    checkpoints = run_dir / "checkpoints"
    check_writable(checkpoints, key)
    if checkpoints.is_dir():
        for path in (*checkpoints.glob("step_*.pt*"), *checkpoints.glob("best.pt*")):
            _check(
                not path.is_dir(),
                key,
                f"{path} is a folder where a checkpoint file belongs; remove it or "
                f"choose another {key}",
            )


def validate(cfg) -> None:
    """Raise ConfigError naming the key and what would be valid: the checks common to every task
    (each task adds its own and the memory check: moa_train.train.tasks.validate runs them all)."""
    known = {f.name for f in fields(TrainConfig)} | {"hydra"}
    for key in cfg:
        _check(
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
    _check_numbers(cfg)
    _one_of(cfg.task.name, "task", tuple(TASK_CONFIGS))
    _check(
        cfg.task.name in data.tasks,
        "task",
        f"{cfg.task.name} does not fit data={data.name} (it feeds: {', '.join(data.tasks)}); use "
        f"task={' or task='.join(data.tasks)} or leave task out",
    )
    _check(
        isinstance(cfg.task, TASK_CONFIGS[cfg.task.name])
        or issubclass(OmegaConf.get_type(cfg.task), TASK_CONFIGS[cfg.task.name]),
        "task.name",
        f"{cfg.task.name} is chosen by the task group: task={cfg.task.name}, not "
        f"task.name={cfg.task.name}",
    )
    _one_of(model.name, "model.name", tuple(sorted(VARIANTS)))
    variant = VARIANTS[model.name]
    _check(
        issubclass(OmegaConf.get_type(model), variant),
        "model.name",
        f"{model.name} is chosen by the model group: model={model.name}, not "
        f"model.name={model.name}",
    )
    variant.validate(model, cfg)

    _one_of(data.tokenizer, "data.tokenizer", ("char", "word", "bpe", "random"))
    if data.tokenizer == "random":
        _check(
            data.name == "random_tokens",
            "data.tokenizer",
            "random goes with data=random_tokens only",
        )
        _check(
            data.vocab_size is not None and 1 < data.vocab_size <= 2**31,
            "data.vocab_size",
            f"random_tokens needs a vocabulary size in 2..{2**31:,} (int32 ids), got "
            f"{data.vocab_size}",
        )
    _one_of(data.split, "data.split", ("official", "moas_paper"))
    if data.tokenizer == "bpe":
        # the BPE trainer reserves memory for the whole vocabulary up front (~70 bytes an entry)
        # and aborts the process where it cannot
        _check(
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
        _check(
            Path(os.path.expanduser(data.root)).is_dir(),
            "data.root",
            f"folder {data.root!r} does not exist; {where}",
        )
    check_writable(data.cache_dir, "data.cache_dir")

    _one_of(trainer.device, "trainer.device", ("auto", "cpu", "cuda"))
    _one_of(trainer.precision, "trainer.precision", ("fp32", "bf16"))
    _one_of(
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
        _check(
            trainer[key] > 0, f"trainer.{key}", f"must be a positive integer, got {trainer[key]}"
        )
    _one_of(trainer.strategy, "trainer.strategy", ("ddp", "fsdp"))
    _one_of(trainer.grad_accum_norm, "trainer.grad_accum_norm", ("mean", "tokens"))
    _check(
        trainer.ddp_bucket_mb > 0,
        "trainer.ddp_bucket_mb",
        f"must be > 0 (MiB; PyTorch's default 25), got {trainer.ddp_bucket_mb}",
    )
    for key in ("eval_iters", "eval_batch_size", "grad_clip", "save_interval"):
        _positive_or_null(trainer[key], f"trainer.{key}")
    _check(
        trainer.keep_checkpoints >= 1,
        "trainer.keep_checkpoints",
        f"must be >= 1, got {trainer.keep_checkpoints}",
    )
    _check(
        0 <= trainer.seed < 2**32,
        "trainer.seed",
        f"must be in 0..{2**32 - 1} (NumPy's seed range), got {trainer.seed}",
    )
    _check_backend(trainer.compile_backend)
    _check(
        trainer.max_bad_steps >= 1,
        "trainer.max_bad_steps",
        f"must be >= 1, got {trainer.max_bad_steps}",
    )
    parse_duration(trainer.max_time)
    stopping = trainer.early_stopping
    _check(
        stopping.patience is None or stopping.patience >= 0,
        "trainer.early_stopping.patience",
        f"must be a number of validations >= 0 (null or 0 = off), got {stopping.patience}",
    )
    _check(
        stopping.min_delta >= 0,
        "trainer.early_stopping.min_delta",
        f"must be >= 0, got {stopping.min_delta}",
    )
    _check(
        not (trainer.cuda_graphs and not optim.fused),
        "optim.fused",
        "false cannot skip a non-finite step inside a CUDA graph (trainer.cuda_graphs=true); use "
        "true",
    )
    resume = trainer.resume
    _check(
        isinstance(resume, bool) or resume in ("auto", "true", "false") or isinstance(resume, str),
        "trainer.resume",
        f"got {resume!r}; allowed: auto, true, false or a path",
    )
    if isinstance(resume, str) and resume not in ("auto", "true", "false"):
        _check(
            Path(os.path.expanduser(resume)).exists(),
            "trainer.resume",
            f"{resume!r} does not exist; allowed: auto, true, false or the path of a checkpoint or "
            "run folder",
        )
    if trainer.eval_only:
        _check(
            resume not in (False, "false", None),
            "trainer.eval_only",
            "needs trainer.resume=PATH (a checkpoint or run folder) or auto/true with a checkpoint "
            "in the run folder",
        )

    _one_of(optim.name, "optim.name", ("adamw",))
    _check(optim.lr > 0, "optim.lr", f"must be positive, got {optim.lr}")
    _check(
        len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
        "optim.betas",
        f"must be two numbers in [0, 1), got {list(optim.betas)}",
    )
    _check(
        optim.weight_decay >= 0 and optim.router_weight_decay >= 0,
        "optim.weight_decay",
        "must be >= 0",
    )
    _check(
        optim.router_lr_mult > 0,
        "optim.router_lr_mult",
        f"must be positive, got {optim.router_lr_mult}",
    )
    _check(optim.eps > 0, "optim.eps", f"must be positive, got {optim.eps}")
    _one_of(schedule.name, "schedule.name", ("constant", "cosine", "inverse_sqrt"))
    _check(
        schedule.warmup_steps >= 0,
        "schedule.warmup_steps",
        f"must be >= 0, got {schedule.warmup_steps}",
    )
    _check(
        0.0 <= schedule.min_lr_ratio <= 1.0,
        "schedule.min_lr_ratio",
        f"must be in [0, 1], got {schedule.min_lr_ratio}",
    )
    _check_name(cfg.experiment_name)
    _positive_or_null(cfg.task.average_last, "task.average_last")
    if cfg.logger.wandb is not None:
        _one_of(
            cfg.logger.wandb.mode, "logger.wandb.mode", ("auto", "online", "offline", "disabled")
        )
        # wandb is an extra: without it the sink would fail only once the run folder exists
        _check(
            importlib.util.find_spec("wandb") is not None,
            "logger=wandb",
            "the wandb package is not installed; install the [wandb] extra: pip install -e "
            "'.[wandb]'",
        )


def check_cross(m, cfg) -> None:
    """model.cross names a variant that can attend to a context, and its keys are that variant's."""
    allowed = tuple(sorted(name for name, config in VARIANTS.items() if config.cross_attention_ok))
    name = m.cross.name
    _check(
        name is None or name in allowed,
        "model.cross.name",
        f"{name!r} is not a cross-attention variant; allowed: null (the model's own), "
        f"{', '.join(allowed)}",
    )
    _check(
        name is not None or set(m.cross) == {"name"},
        "model.cross",
        f"keys {', '.join(sorted(set(m.cross) - {'name'}))} need model.cross.name (the variant "
        "that owns them)",
    )
    try:
        cross = cross_config(m)
        OmegaConf.get_type(cross).validate(cross, cfg)
    # the variant names its own keys model.<key>: here they are model.cross.<key>
    except ConfigError as exc:
        key, _, rest = str(exc).partition(": ")
        if key.removeprefix("model.") in variant_keys(ModelConfig):
            raise
        raise ConfigError(f"model.cross.{key.removeprefix('model.')}: {rest}") from None


def _check_name(name: str) -> None:
    """experiment_name is a folder under outputs/: a `..` or an absolute path would write outside
    it, and a character that does not print (a newline) would hide in its name."""
    _check(
        str(name).isprintable(),
        "experiment_name",
        f"{name!r} holds a character that does not print; allowed: letters, digits, - _ . /",
    )
    parts = Path(str(name)).parts
    _check(
        bool(str(name).strip()) and ".." not in parts and not Path(str(name)).is_absolute(),
        "experiment_name",
        f"{name!r} would name a folder outside outputs/; allowed: a relative name without '..' "
        "(letters, digits, - _ . /)",
    )


def _check_backend(backend) -> None:
    if backend is None:
        return
    import torch._dynamo  # only when a backend is named: the import takes a moment

    allowed = sorted(b for b in torch._dynamo.list_backends(exclude_tags=()) if "TESTING" not in b)
    _one_of(backend, "trainer.compile_backend", ("null (the default)", *allowed))


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


def layer_params(m, cross: bool = False) -> int:
    """The parameters of one block of model config `m`: its attention (as the variant counts it)
    and the MLP; `cross`: a decoder block's cross-attention too. Norms are left out (a lower
    bound)."""
    hidden = int(m.mlp_ratio * m.d_model)
    mlp = 2 * m.d_model * hidden + (hidden + m.d_model if m.bias else 0)
    attention = OmegaConf.get_type(m).attention_params(m)
    if cross:
        other = cross_config(m)
        attention += OmegaConf.get_type(other).attention_params(other)
    return attention + mlp


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
    _check(
        train <= total,
        size.key,
        f"{size.text} over trainer.grad_accum={t.grad_accum} micro-batches needs at least "
        f"{gib(train)}, more than the {where} ({gib(total)}); lower it or raise "
        "trainer.grad_accum",
    )
    if evaluation is not None:
        need = weights + activation_bytes(cfg, evaluation.tokens)
        _check(
            need <= total,
            evaluation.key,
            f"{evaluation.text} needs at least {gib(need)} to evaluate, more than the {where} "
            f"({gib(total)}); lower {evaluation.lower}",
        )


# --- the package's variants and tasks -------------------------------------------------------------
# Every composition of configs/train.yaml needs their schemas in the ConfigStore (and VARIANTS /
# TASK_CONFIGS filled): they register here, after every name above is defined, since their modules
# import this one.
import moa_train.models.registry  # noqa: E402
import moa_train.train.task_registry  # noqa: E402, F401
