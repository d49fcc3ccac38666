"""Tasks: what differs between language modelling and translation, behind one small interface that
the trainer, `load_run`, `eval_only`, sweeps and reports use: the task's own config checks and step
size, building the model for its data, drawing a training batch, the loss, evaluating a split (and
its metric names), the metric that picks the best checkpoint, counting FLOPs. Each task declares
its keys (`task.*`) in a config class beside it; `register_task` (the lines are in
moa_train/train/task_registry.py; a plugin calls it too) maps `task.name` (configs/task/, defaulting
to the data's) to both.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moa_train.config_format import upgrade
from moa_train.data.batches import RandomWindows
from moa_train.data.tokenizer import TOKENIZER_FILE, tokenizer_identity
from moa_train.io import atomic_write
from moa_train.models.routing import aux_losses, weighted_aux
from moa_train.models.variants import VARIANTS, check_cross, cross_config, layer_params
from moa_train.progress import progress
from moa_train.schema import TASK_CONFIGS, TaskConfig, register_task_config, variant_keys
from moa_train.train.distributed import Dist, gather_objects, global_sum, rank_share
from moa_train.train.evaluate import evaluate as evaluate_lm
from moa_train.train.preemption import check_stop
from moa_train.validation import (
    ConfigError,
    SizePart,
    StepSize,
    check,
    check_memory,
    divisors,
    one_of,
    positive_or_null,
)
from moa_train.validation import validate as validate_common

log = logging.getLogger(__name__)


class Task:
    """The interface. Built from the run's config (`Task(cfg, device, dist)`), a task holds `model`,
    `batches` (the training sampler, whose state the checkpoint keeps) and answers `next_batch()`,
    `n_tokens(batch)`, `loss(model, batch, all_aux)` -> (total, CE, aux terms, routing records),
    `evaluate(forward, split, prefix, autocast, final, stop)` -> metrics, `flops_per_token()`.
    Before any work, the class answers what follows."""

    # whether a whole step can be captured in one CUDA graph (fixed batch shapes)
    cuda_graphs_ok = False
    # the validation metric (lower is better) that picks best.pt; sweeps minimise it
    best_metric = "val/loss"
    metrics: tuple = ()  # the evaluation metrics that reports show, in their column order
    # the metrics (after the split's "/") of the log line of an evaluation, in its order
    headline: tuple = ("loss",)
    # the summary.json keys a sweep's summary shows for a job
    summary_keys: tuple = ("val/loss", "test/loss")
    # the task.* keys that only say how to evaluate: an eval_only command may set them
    eval_keys: tuple = ("task.average_last",)
    # the task.* keys a resumed run keeps (what its data is), besides task.name
    fixed_keys: tuple = ()
    # what the checkpoints record of the tokenizer the weights are trained with (sha256 of its
    # tokenizer.json and vocabulary size: tokenizer.tokenizer_identity); None: no tokenizer file
    tokenizer_id: dict | None = None

    @staticmethod
    def check(cfg, world_size: int) -> None:
        """ConfigError for values this task cannot run with (the common checks are
        config.validate's)."""

    @staticmethod
    def step_size(cfg) -> StepSize:
        raise NotImplementedError

    @staticmethod
    def model_size(cfg) -> tuple:
        """The SizeParts of the task's model, for the memory check (none: not counted)."""
        return ()

    @staticmethod
    def eval_size(cfg) -> StepSize | None:
        """An evaluation batch sized apart from the training step (None: the step's sizes)."""
        return None

    @staticmethod
    def build_model(model_cfg, vocab_size: int, pad_id):
        """The task's model for a vocabulary (and padding id, where the task pads); `load_run`
        rebuilds with it."""
        raise NotImplementedError

    def summary(self) -> dict:
        """What the task adds to the run's summary.json, after everything else."""
        return {}

    @classmethod
    def headline_of(cls, metrics: dict) -> str:
        """The log line of an evaluation's (or summary's) figures."""
        return " | ".join(
            f"{k} {v:.4f}"
            for k, v in metrics.items()
            if k.partition("/")[2] in cls.headline and isinstance(v, float)
        )

    def save_tokenizer(self, run_dir: Path) -> None:
        """Write the tokenizer into the run folder, so the folder alone can be generated from
        (moa_train.api)."""


def window_batch(cfg, key: str, given, batch: int, lower: str) -> StepSize:
    """An LM batch of `batch` windows of trainer.block_size tokens, sized by `key` (`given`: its
    value as the user set it; `lower`: what to lower)."""
    block = cfg.trainer.block_size
    return StepSize(
        key, f"{key}={given} x trainer.block_size={block}", lower, batch * block, cfg.model.n_layer
    )


@dataclass
class LMConfig(TaskConfig):
    """Language modelling: no keys of its own (its sizes are trainer.batch_size and
    trainer.block_size)."""


class LMTask(Task):
    """Decoder-only LM on a token stream: random windows, next-token cross-entropy."""

    cuda_graphs_ok = True  # fixed shapes
    metrics = ("val/loss", "val/bpc", "test/loss")
    headline = ("loss", "bpc")
    summary_keys = ("val/loss", "val/bpc", "test/loss")
    # ids a task appends to the data's vocabulary (MLM's [MASK]); the tokenizer stays the data's
    added_ids = 0
    windows = RandomWindows  # the training sampler's class

    @staticmethod
    def check(cfg, world_size: int) -> None:
        m, t = cfg.model, cfg.trainer
        check(
            m.init == "standard",
            "model.init",
            f"{m.init} initialises the encoder-decoder (translation); the LM takes GPT-2's init: "
            "use standard",
        )
        check(
            t.block_size <= m.max_seq_len,
            "trainer.block_size",
            f"{t.block_size} exceeds model.max_seq_len={m.max_seq_len}; valid: 1..{m.max_seq_len}",
        )
        check(
            t.batch_size % t.grad_accum == 0,
            "trainer.grad_accum",
            f"{t.grad_accum} does not divide trainer.batch_size={t.batch_size}; valid: "
            f"{divisors(t.batch_size)}",
        )
        slices = world_size * t.grad_accum
        check(
            world_size == 1 or t.batch_size % slices == 0,
            "trainer.batch_size",
            f"{t.batch_size} sequences do not split over {world_size} ranks x "
            f"trainer.grad_accum={t.grad_accum} micro-batches; valid: multiples of {slices}",
        )

    @staticmethod
    def step_size(cfg) -> StepSize:
        batch = cfg.trainer.batch_size
        lower = "trainer.batch_size or trainer.block_size"
        return window_batch(cfg, "trainer.batch_size", batch, batch, lower)

    @staticmethod
    def model_size(cfg) -> tuple:
        """The blocks, the learned position table and the tied embedding (where the config sets the
        vocabulary: model.vocab_size, or random_tokens' data.vocab_size)."""
        m, d = cfg.model, cfg.data
        vocab_key = "model.vocab_size" if m.vocab_size else "data.vocab_size"
        vocab = m.vocab_size or (d.vocab_size if d.tokenizer == "random" else 0)
        return (
            layers_part(m, m.n_layer),
            positions_part(m, table=m.positions != "rope"),
            SizePart(
                vocab_key,
                f"the embedding of {vocab_key}={vocab} x model.d_model={m.d_model}",
                vocab * m.d_model,
            ),
        )

    @staticmethod
    def eval_size(cfg) -> StepSize:
        """An evaluation batch: trainer.eval_batch_size windows (null: trainer.batch_size) on every
        rank."""
        t = cfg.trainer
        batch = t.eval_batch_size or t.batch_size
        given = (
            f"{t.eval_batch_size}" if t.eval_batch_size else f"null (trainer.batch_size={batch})"
        )
        key = "trainer.eval_batch_size"
        return window_batch(cfg, key, given, batch, key)

    @staticmethod
    def build_model(model_cfg, vocab_size: int, pad_id=None):
        from moa_train.models import build_model

        return build_model(model_cfg, vocab_size)

    def __init__(self, cfg, device: torch.device, dist: Dist = Dist()):
        from moa_train.data import load_data
        from moa_train.data.tokens import check_lengths

        self.cfg, self.device, self.dist = cfg, device, dist
        # a plain dataclass: no OmegaConf inside compiled code
        self.aux_cfg = OmegaConf.to_object(cfg.model.aux)
        self.data = load_data(cfg.data)
        check_lengths(self.data, cfg.trainer.block_size)
        if self.data.tokenizer_file is not None:  # read once: the cache entry may go mid-run
            raw = self.data.tokenizer_file.read_bytes()
            self.tokenizer_id = tokenizer_identity(raw, self.data.vocab_size)
        ids = self.data.vocab_size + self.added_ids
        vocab = cfg.model.vocab_size or ids
        if vocab < ids:
            raise ConfigError(
                f"model.vocab_size: {vocab} is smaller than the data's {ids}; "
                "use null (from the data) or a larger value"
            )
        self.model = self.build_model(cfg.model, vocab)
        t = cfg.trainer
        self.batches = self.windows(
            self.data.splits["train"].tokens,
            t.batch_size // t.grad_accum,
            t.block_size,
            t.seed,
            device,
            dist.rank,
            dist.world,
            last_start=t.sample_last_window,
        )

    def next_batch(self) -> tuple:
        """(window offsets,): the loss gathers the windows, inside a captured CUDA graph when there
        is one."""
        return (self.batches.next_starts(),)

    def n_tokens(self, batch) -> int:
        """Tokens of the global micro-batch (every rank's slice is the same size)."""
        return batch[0].numel() * self.cfg.trainer.block_size * self.dist.world

    def loss(self, model, batch, all_aux: bool) -> tuple:
        """(total loss, CE, unweighted aux terms, routing records)."""
        x, y = self.batches.windows_at(batch[0])
        logits, routings = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        aux = aux_losses(routings, self.aux_cfg, all_aux)
        return ce + weighted_aux(aux, self.aux_cfg, y.numel()), ce, aux, routings

    def evaluate(
        self, forward, split: str, prefix: str, autocast, final: bool = False, stop=None
    ) -> dict:
        t = self.cfg.trainer
        return evaluate_lm(
            forward,
            self.data.splits[split],
            prefix,
            t.eval_batch_size or t.batch_size,
            t.block_size,
            t.eval_iters,
            self.device,
            autocast,
            self.dist,
            stop,
        )

    def flops_per_token(self) -> int:
        return self.model.flops_per_token(self.cfg.trainer.block_size)

    def save_tokenizer(self, run_dir: Path) -> None:
        source, target = self.data.tokenizer_file, Path(run_dir) / TOKENIZER_FILE
        # a resumed run keeps the file its first start wrote
        if source is not None and not target.is_file():
            atomic_write(target, lambda f: f.write(source.read_bytes()))


def smoothed_nll(logits, target, pad_id: int, eps: float, over: str = "all"):
    """Label-smoothed cross-entropy summed over the non-pad targets. over=all: PyTorch's (the target
    gets 1 - eps + eps/V, every class eps/V); over=others: fairseq's (the target gets 1 - eps, every
    other class eps/(V-1))."""
    if over == "all" or not eps:
        return F.cross_entropy(
            logits, target, ignore_index=pad_id, label_smoothing=eps, reduction="sum"
        )
    logp = logits.log_softmax(-1)
    keep = target != pad_id
    nll = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    smooth = -logp.sum(-1)
    eps_i = eps / (logits.shape[-1] - 1)
    return (((1.0 - eps - eps_i) * nll + eps_i * smooth) * keep).sum()


# a beam keeps beam x vocabulary scores per sentence; beyond this it only costs memory (fairseq: 5)
MAX_BEAM = 64


@dataclass
class TranslationConfig(TaskConfig):
    """Translation: the direction, the step size, label smoothing, and decoding and scoring
    (sacreBLEU and chrF on detokenised text)."""

    src: str = "en"  # source language (file suffix)
    tgt: str = "de"  # target language
    max_tokens: int = 4096  # tokens (source + target, padding included) per optimizer step, global
    max_len: int = 256  # training pairs with a longer side (in BPE tokens) are dropped
    # label-smoothed cross-entropy (MoA / Transformer: 0.1)
    label_smoothing: float = 0.0
    # where the smoothing mass eps goes: all (PyTorch: eps / V on every class, the target included)
    # | others (fairseq: eps / (V - 1) on every other class, the target keeps 1 - eps)
    label_smoothing_over: str = "all"
    beam: int = 4  # beam size for the final test evaluation (MoA: 4)
    lenpen: float = 0.6  # length penalty: score / len**lenpen (MoA: 0.6)
    val_beam: int = 1  # beam during training's validation; 1 = greedy
    max_len_a: float = 1.2  # output length limit: a * source length + b
    max_len_b: int = 10
    # EOS is refused before this many output tokens (fairseq-generate's --min-len: 1)
    min_len: int = 0
    # true: at the length limit only EOS may follow, and its log-probability counts in the score
    # (fairseq's SequenceGenerator); false: beams cut at the limit are scored as they stand
    force_eos: bool = False
    # plain: the source as it is, the decoder input starts with BOS | fairseq: every source ends in
    # EOS and the decoder input starts with EOS (fairseq's translation batches)
    batch_format: str = "plain"
    # decode (and score BLEU / chrF on) only the first N sentences of valid and test; null = all.
    # The loss is always over the whole split. For smoke runs: decoding dominates a short
    # translation run on a CPU
    max_sentences: int | None = None
    # decode through the decoder's KV cache, the source's cross-attention K/V computed once (the
    # same hypotheses); false: recompute the whole prefix at every step. A variant without the
    # inference contract always recomputes
    kv_cache: bool = True


class TranslationTask(Task):
    """Encoder-decoder on sentence pairs: batches by tokens, label-smoothed cross-entropy, BLEU by
    search."""

    cuda_graphs_ok = False  # batch shapes vary
    metrics = ("val/loss", "test/loss", "val/bleu", "test/bleu")
    headline = ("loss", "bleu", "chrf")
    summary_keys = ("val/loss", "val/bleu", "test/loss", "test/bleu")
    fixed_keys = ("task.src", "task.tgt", "task.max_len", "task.max_tokens")
    eval_keys = (
        "task.average_last",
        "task.beam",
        "task.lenpen",
        "task.val_beam",
        "task.max_len_a",
        "task.max_len_b",
        "task.min_len",
        "task.force_eos",
        "task.max_sentences",
        "task.kv_cache",
    )

    @staticmethod
    def check(cfg, world_size: int) -> None:
        m, e = cfg.model, cfg.task
        check(
            e.max_tokens > 0, "task.max_tokens", f"must be a positive integer, got {e.max_tokens}"
        )
        check(
            0.0 <= e.label_smoothing < 1.0,
            "task.label_smoothing",
            f"must be in [0, 1), got {e.label_smoothing}",
        )
        one_of(e.label_smoothing_over, "task.label_smoothing_over", ("all", "others"))
        one_of(e.batch_format, "task.batch_format", ("plain", "fairseq"))
        check(e.min_len >= 0, "task.min_len", f"must be >= 0 (fairseq: 1), got {e.min_len}")
        positive_or_null(e.max_sentences, "task.max_sentences")
        check(
            1 <= e.max_len < m.max_seq_len,
            "task.max_len",
            f"{e.max_len} does not leave room for BOS/EOS in model.max_seq_len={m.max_seq_len}; "
            f"valid: 1..{m.max_seq_len - 1}",
        )
        check_cross(m, cfg)
        if m.init == "fairseq":
            from moa_train.models.registry import ATTENTION

            ok = sorted(name for name, cls in ATTENTION.items() if hasattr(cls, "init_fairseq"))
            for key, name in (("model.name", m.name), ("model.cross.name", cross_config(m).name)):
                check(
                    name in ok,
                    "model.init",
                    f"fairseq has no init for {key}={name}; valid with: {', '.join(ok)}",
                )
        check(
            cfg.trainer.strategy == "ddp",
            "trainer.strategy",
            "fsdp shards decoder-only LMs; translation runs use ddp",
        )
        for key in ("beam", "val_beam"):
            check(1 <= e[key] <= MAX_BEAM, f"task.{key}", f"must be in 1..{MAX_BEAM}, got {e[key]}")
        check(
            math.isfinite(e.lenpen),
            "task.lenpen",
            f"must be a finite number (MoA: 0.6), got {e.lenpen}",
        )
        check(
            math.isfinite(e.max_len_a) and e.max_len_a >= 0,
            "task.max_len_a",
            f"must be a finite number >= 0 (MoA: 1.2), got {e.max_len_a}",
        )
        check(e.max_len_b >= 0, "task.max_len_b", f"must be >= 0 (MoA: 10), got {e.max_len_b}")

    @staticmethod
    def step_size(cfg) -> StepSize:
        m = cfg.model
        return StepSize(
            "task.max_tokens",
            f"task.max_tokens={cfg.task.max_tokens}",
            "task.max_tokens",
            cfg.task.max_tokens,
            m.n_layer + (m.n_encoder_layer or m.n_layer),
        )

    @staticmethod
    def model_size(cfg) -> tuple:
        """The encoder and decoder blocks and the position table (learned: trained; sinusoidal: a
        fixed table); the embedding's size is the data's (its BPE), left out."""
        m = cfg.model
        return (
            layers_part(m, m.n_encoder_layer or m.n_layer, "encoder "),
            layers_part(m, m.n_layer, "decoder ", cross=True),
            positions_part(m, learned=m.positions == "learned", table=m.positions != "rope"),
        )

    @staticmethod
    def build_model(model_cfg, vocab_size: int, pad_id):
        from moa_train.models.seq2seq import Seq2Seq

        return Seq2Seq(model_cfg, vocab_size, pad_id)

    def __init__(self, cfg, device: torch.device, dist: Dist = Dist()):
        from moa_train.data.translation import TokenBatches, load_translation

        self.cfg, self.device, self.dist = cfg, device, dist
        self.aux_cfg = OmegaConf.to_object(cfg.model.aux)
        self.label_smoothing = float(cfg.task.label_smoothing)
        # long val/test lines cut to fit
        self.data = load_translation(cfg.data, cfg.model.max_seq_len, cfg.task)
        self.model = self.build_model(cfg.model, self.data.vocab_size, self.data.pad_id)
        d = self.data
        per_micro = cfg.task.max_tokens // cfg.trainer.grad_accum
        self.batches = TokenBatches(
            d.splits["train"],
            per_micro,
            d.pad_id,
            d.bos_id,
            d.eos_id,
            seed=cfg.trainer.seed,
            shuffle=True,
            device=device,
            rank=dist.rank,
            world=dist.world,
            batch_format=cfg.task.batch_format,
        )
        self.train_iter = iter(self.batches)
        self.bleu_signature = None

    def next_batch(self):
        return next(self.train_iter)

    def n_tokens(self, batch) -> int:
        return int(batch["n_tokens"])

    def loss(self, model, batch, all_aux: bool) -> tuple:
        """Label-smoothed cross-entropy per real target token (train/loss), plus aux terms over real
        tokens.

        Under data parallelism the slices of a batch hold different numbers of tokens: each rank
        divides its sum by the global count / ranks, so the mean over ranks that DDP takes is the
        per-token mean of the global batch."""
        logits, routings = model(batch["src"], batch["tgt_in"])
        target = batch["tgt_out"]
        n = global_sum((target != self.data.pad_id).sum()).clamp_min(1) / self.dist.world
        ce = (
            smoothed_nll(
                logits.flatten(0, 1).float(),
                target.flatten(),
                self.data.pad_id,
                self.label_smoothing,
                self.cfg.task.label_smoothing_over,
            )
            / n
        )
        aux = aux_losses(routings, self.aux_cfg, all_aux)
        return ce + weighted_aux(aux, self.aux_cfg, n), ce, aux, routings

    @torch.no_grad()
    def evaluate(
        self, forward, split: str, prefix: str, autocast, final: bool = False, stop=None
    ) -> dict:
        """NLL per target token over the split, and BLEU / chrF of the decoded split (beam search at
        the end of training, greedy or the configured val beam during it; the first
        task.max_sentences sentences where set). Under data parallelism each rank takes its share of
        the batches; sums and hypotheses are gathered. A signal in `stop` (the trainer's
        StopSignals) ends it before the next batch (EvaluationStopped)."""
        from moa_train.metrics.bleu import corpus_scores, tokenized_bleu

        e, model = self.cfg.task, self.model
        was_training = model.training
        model.eval()
        data = self.data.splits[split]
        n = len(data) if e.max_sentences is None else min(e.max_sentences, len(data))
        decoded = data if n == len(data) else first_pairs(data, n)
        loss = self._nll(forward, data, prefix, autocast, stop)
        beam = e.beam if final else e.val_beam
        hyps = self._decode(decoded, f"{prefix} (beam {beam})", beam, autocast, stop)
        model.train(was_training)
        scores = corpus_scores(hyps, decoded.tgt_text)
        out = {
            f"{prefix}/loss": loss,
            f"{prefix}/ppl": math.exp(min(loss, 50.0)),
            f"{prefix}/bleu": scores["bleu"],
            f"{prefix}/chrf": scores["chrf"],
            f"{prefix}/bleu_tok": tokenized_bleu(hyps, decoded.tgt_text),
        }
        if n < len(data):
            out[f"{prefix}/bleu_sentences"] = n
            log.info(
                "%s: BLEU and chrF on the first %d of %d sentences (task.max_sentences)",
                prefix,
                n,
                len(data),
            )
        self.bleu_signature = scores["bleu_signature"]
        return out

    def summary(self) -> dict:
        """The sacreBLEU signature of the last evaluation (where one ran)."""
        return {"bleu_signature": self.bleu_signature} if self.bleu_signature else {}

    def _my_batches(self, data, desc: str, stop=None):
        """This rank's share of the split's batches (length-sorted, as many rounds on every rank); a
        signal in `stop` ends them."""
        from moa_train.data.translation import TokenBatches

        d = self.data
        batches = TokenBatches(
            data,
            self.cfg.task.max_tokens,
            d.pad_id,
            d.bos_id,
            d.eos_id,
            shuffle=False,
            device=self.device,
            batch_format=self.cfg.task.batch_format,
        )
        share = rank_share(batches, self.dist)
        # translation runs use DDP: no collective in the forward, so a rank skips the batches of
        # others
        for batch, mine in progress(
            share, desc=desc, unit="batch", total=-(-len(batches) // self.dist.world)
        ):
            check_stop(stop)
            if mine:
                yield batch

    def _nll(self, forward, data, prefix: str, autocast, stop=None) -> float:
        """Cross-entropy per real target token over the whole split (every rank's sums gathered)."""
        total, count = 0.0, 0
        for batch in self._my_batches(data, f"eval {prefix} (loss)", stop):
            with autocast():
                logits, _ = forward(batch["src"], batch["tgt_in"])
            total += F.cross_entropy(
                logits.flatten(0, 1).float(),
                batch["tgt_out"].flatten(),
                ignore_index=self.data.pad_id,
                reduction="sum",
            ).item()
            count += int(batch["n_tokens"])
        total, count = global_sum(
            torch.tensor([total, count], dtype=torch.float64, device=self.device)
        ).tolist()
        return total / max(count, 1)

    def _decode(self, data, desc: str, beam: int, autocast, stop=None) -> list:
        """Detokenised hypotheses of every sentence of `data`, in order (every rank's gathered)."""
        from moa_train.models.search import max_output_len, search

        d, e, model = self.data, self.cfg.task, self.model
        hyps = {}  # sentence index -> detokenised hypothesis
        for batch in self._my_batches(data, f"eval {desc}", stop):
            src_mask = batch["src"] != d.pad_id
            max_len = min(
                max_output_len(src_mask, e.max_len_a, e.max_len_b), self.cfg.model.max_seq_len - 1
            )
            rules = {
                "min_len": e.min_len,
                "force_eos": e.force_eos,
                "start_id": d.eos_id if e.batch_format == "fairseq" else d.bos_id,
                "use_cache": e.kv_cache,
                "beam": None if beam == 1 else beam,  # one beam: greedy search
                "lenpen": e.lenpen,
            }
            with autocast():
                out = search(
                    model, batch["src"], src_mask, d.bos_id, d.eos_id, d.pad_id, max_len, **rules
                )
            for i, ids in zip(batch["index"].tolist(), out, strict=True):
                hyps[i] = d.decode(ids)
        hyps = {i: text for part in gather_objects(hyps, self.dist) for i, text in part.items()}
        return [hyps[i] for i in range(len(data.src))]

    def flops_per_token(self) -> int:
        """At the mean target length of the training pairs (attention cost grows with it)."""
        # lengths with EOS
        return self.model.flops_per_token(round(float(self.batches.tgt_len.mean())))


def first_pairs(split, n: int):
    """The first `n` sentence pairs of a split (in file order)."""
    from dataclasses import replace

    return replace(
        split,
        src=split.src[:n],
        tgt=split.tgt[:n],
        src_text=split.src_text[:n],
        tgt_text=split.tgt_text[:n],
    )


def layers_part(m, n: int, kind: str = "", cross: bool = False) -> SizePart:
    """`n` blocks of model config `m` (decoder blocks with `cross`); `kind` names them in the
    message."""
    per_layer = layer_params(m, cross)
    return SizePart(
        "model.d_model",
        f"{n} {kind}layers of model={m.name} at model.d_model={m.d_model} ({per_layer:,} "
        "parameters each)",
        n * per_layer,
    )


def positions_part(m, learned: bool = True, table: bool = True) -> SizePart:
    """The position table, model.max_seq_len x model.d_model: trained, or a fixed sinusoidal one;
    none (`table` false) for rotary positions."""
    n = m.max_seq_len * m.d_model if table else 0
    text = f"the position table of model.max_seq_len={m.max_seq_len} x model.d_model={m.d_model}"
    return SizePart("model.max_seq_len", text, n if learned else 0, 0 if learned else n)


TASKS: dict = {}  # task name -> its class; filled by register_task


def register_task(name: str, task: type, config: type, yaml: str | Path | None = None) -> None:
    """Add task `name`: its class (a Task) and its config class (a TaskConfig subclass, the schema
    of configs/task/<name>.yaml, which lists `_schema_<name>` first in its defaults). `yaml`: a
    task YAML from outside configs/task/ (a plugin's). The package's tasks are registered first."""
    from moa_train.train.task_registry import register_package_tasks

    register_package_tasks()
    if not (isinstance(task, type) and issubclass(task, Task)):
        raise TypeError(f"register_task({name!r}): {task!r} is not a Task subclass")
    if not (isinstance(config, type) and issubclass(config, TaskConfig)):
        raise TypeError(f"register_task({name!r}): {config!r} is not a TaskConfig subclass")
    TASKS[name] = task
    register_task_config(name, config, yaml)


def task_config(node):
    """`node` (a task config: a dict or DictConfig holding `name`) typed by its task's config
    class; a key of another task is refused naming its owner."""
    from omegaconf.errors import ConfigKeyError

    from moa_train.schema import foreign_task_key

    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    task_class(data.get("name"))  # a task that exists
    config = TASK_CONFIGS[data["name"]]
    try:
        return OmegaConf.merge(OmegaConf.structured(config), data)
    except ConfigKeyError as exc:
        raise ConfigError(foreign_task_key(f"task.{exc.key}", config)) from None


def task_class(name: str) -> type:
    from moa_train.train.task_registry import register_package_tasks

    register_package_tasks()

    if name not in TASKS:
        raise ConfigError(f"task: got {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def make_task(cfg, device: torch.device, dist: Dist = Dist()) -> Task:
    return task_class(cfg.task.name)(cfg, device, dist)


def validate(cfg, world_size: int = 1) -> None:
    """The whole config check before any work: the common checks (config.validate), the task's own,
    then whether the task's step fits the device's memory. `world_size`: the torchrun processes the
    global batch is split over."""
    task = task_class(cfg.task.name)
    validate_common(cfg, VARIANTS)
    task.check(cfg, world_size)
    check_memory(cfg, task.model_size(cfg), task.step_size(cfg), world_size, task.eval_size(cfg))


def default_task(data_name: str) -> str:
    """The default task of a data set as shipped in configs/data/ (its `tasks` list first; lm where
    that file is gone or names none)."""
    from moa_train.paths import config_dir

    shipped = config_dir() / "data" / f"{data_name}.yaml"
    if not shipped.is_file():
        return "lm"
    node = OmegaConf.load(shipped)
    return (node.get("tasks") or [node.get("task", "lm")])[0]


def model_keys(variant: str) -> set | None:
    """The keys variant `variant`'s config owns (the common model keys included); None for a
    variant not registered in this process (a plugin's not loaded)."""
    from moa_train.models.registry import register_package_variants

    register_package_variants()
    return variant_keys(VARIANTS[variant]) if variant in VARIANTS else None


def saved_config(config: dict) -> dict:
    """A run's saved config (a plain dict) in the current layout (moa_train/config_format.py)."""
    return upgrade(config, default_task, model_keys)


def saved_task(config: dict) -> str:
    """The task of a run's saved config, of any layout (configs written before tasks were named
    take their data's default task as shipped in configs/data/)."""
    return saved_config(config)["task"]["name"]


def report_metrics() -> tuple:
    """Every task's evaluation metrics, in the order of their first appearance (report and sweep
    columns)."""
    from moa_train.train.task_registry import register_package_tasks

    register_package_tasks()
    return tuple(dict.fromkeys(m for task in TASKS.values() for m in task.metrics))
