"""The config schema (Hydra structured configs) of `configs/train.yaml`.

Hydra merges every group's YAML into these dataclasses, so a misspelt key or a value of the wrong
type is refused at composition with the key's full name. A variant's keys come from its config
class (a ModelConfig subclass, registered in moa_train.models.variants), a task's from its config
class (a TaskConfig subclass, registered in TASK_CONFIGS below). moa_train.validation checks the
values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from moa_train.config_format import CONFIG_FORMAT
from moa_train.validation import check, divisors, one_of, positive_or_null


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
            check(m[key] > 0, f"model.{key}", f"must be a positive integer, got {m[key]}")
        positive_or_null(m.n_encoder_layer, "model.n_encoder_layer")
        check(
            math.isfinite(m.mlp_ratio) and m.mlp_ratio * m.d_model >= 1,
            "model.mlp_ratio",
            "must be finite and give an MLP of at least 1 unit (mlp_ratio * model.d_model >= 1), "
            f"got {m.mlp_ratio}",
        )
        for key in ("dropout", "activation_dropout", "decoder_activation_dropout", "attn_dropout"):
            if m[key] is not None:  # (null: another key's value)
                check(0.0 <= m[key] < 1.0, f"model.{key}", f"must be in [0, 1), got {m[key]}")
        one_of(m.activation, "model.activation", ("gelu", "relu"))
        one_of(m.init, "model.init", ("standard", "fairseq"))
        one_of(m.pad_positions, "model.pad_positions", ("kept", "zeroed"))
        one_of(m.aux.z_tokens, "model.aux.z_tokens", ("real", "all"))
        one_of(m.aux.cv_of, "model.aux.cv_of", ("probs", "gates"))
        for key in ("balance_coef", "z_coef", "cv_coef", "kv_budget_coef"):
            check(m.aux[key] >= 0, f"model.aux.{key}", f"must be >= 0, got {m.aux[key]}")
        one_of(m.aux.layer_reduce, "model.aux.layer_reduce", ("mean", "sum"))
        one_of(m.aux.balance_type, "model.aux.balance_type", ("mse", "switch", "switch_k"))
        one_of(
            m.positions, "model.positions", ("learned", "sinusoidal", "sinusoidal_fairseq", "rope")
        )
        check(
            m.positions != "rope" or cls.rope_ok,
            "model.positions",
            f"model={m.name} does not take rope; allowed: learned, sinusoidal, sinusoidal_fairseq",
        )
        check(
            m.positions == "rope" or not cls.rope_required,
            "model.positions",
            f"model={m.name} is defined with rotary positions: needs rope, got {m.positions!r}",
        )
        check(
            0.0 < m.rope_fraction <= 1.0,
            "model.rope_fraction",
            f"must be in (0, 1], got {m.rope_fraction}",
        )
        check(m.rope_base > 1.0, "model.rope_base", f"must be > 1, got {m.rope_base}")
        if m.vocab_size is not None:
            check(
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
        check(
            m.d_model % m.n_head == 0,
            "model.n_head",
            f"{m.n_head} does not divide model.d_model={m.d_model}; valid: {divisors(m.d_model)}",
        )


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


def variant_keys(config: type) -> set:
    """The keys of a config class (a variant's: the common model keys included)."""
    return {f.name for f in fields(config)}


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
