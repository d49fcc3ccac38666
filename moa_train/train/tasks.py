"""What differs between language modelling and translation, behind one small interface the trainer uses:
build the model, draw a training batch, compute the loss, evaluate a split, count FLOPs.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moa_train.config import TRANSLATION_DATA, ConfigError
from moa_train.data.batches import RandomWindows
from moa_train.models.routing import aux_losses, weighted_aux
from moa_train.progress import progress
from moa_train.train.distributed import Dist, gather_objects, global_sum, rank_share
from moa_train.train.evaluate import evaluate as evaluate_lm
from moa_train.train.preemption import check_stop

log = logging.getLogger(__name__)


class LMTask:
    """Decoder-only LM on a token stream: random windows, next-token cross-entropy."""

    cuda_graphs_ok = True  # fixed shapes

    def __init__(self, cfg, device: torch.device, dist: Dist = Dist()):
        from moa_train.data import load_data
        from moa_train.data.wikitext import check_lengths
        from moa_train.models import build_model

        self.cfg, self.device, self.dist = cfg, device, dist
        self.aux_cfg = OmegaConf.to_object(cfg.model.aux)  # a plain dataclass: no OmegaConf inside compiled code
        self.data = load_data(cfg.data)
        check_lengths(self.data, cfg.trainer.block_size)
        vocab = cfg.model.vocab_size or self.data.vocab_size
        if vocab < self.data.vocab_size:
            raise ConfigError(f"model.vocab_size: {vocab} is smaller than the data's {self.data.vocab_size}; "
                              "use null (from the data) or a larger value")
        self.model = build_model(cfg.model, vocab)
        t = cfg.trainer
        self.batches = RandomWindows(self.data.splits["train"].tokens, t.batch_size // t.grad_accum, t.block_size,
                                     t.seed, device, dist.rank, dist.world)

    def next_batch(self) -> tuple:
        """(window offsets,): the loss gathers the windows, inside a captured CUDA graph when there is one."""
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
        return ce + weighted_aux(aux, self.aux_cfg), ce, aux, routings

    def evaluate(self, forward, split: str, prefix: str, autocast, final: bool = False, stop=None) -> dict:
        t = self.cfg.trainer
        return evaluate_lm(forward, self.data.splits[split], prefix, t.eval_batch_size or t.batch_size,
                           t.block_size, t.eval_iters, self.device, autocast, self.dist, stop)

    def flops_per_token(self) -> int:
        return self.model.flops_per_token(self.cfg.trainer.block_size)


class TranslationTask:
    """Encoder-decoder on sentence pairs: batches by tokens, label-smoothed cross-entropy, BLEU by search."""

    cuda_graphs_ok = False  # batch shapes vary

    def __init__(self, cfg, device: torch.device, dist: Dist = Dist()):
        from moa_train.data.translation import TokenBatches, load_translation
        from moa_train.models.seq2seq import Seq2Seq

        self.cfg, self.device, self.dist = cfg, device, dist
        self.aux_cfg = OmegaConf.to_object(cfg.model.aux)
        self.label_smoothing = float(cfg.trainer.label_smoothing)
        self.data = load_translation(cfg.data, cfg.model.max_seq_len)  # long val/test lines cut to fit
        self.model = Seq2Seq(cfg.model, self.data.vocab_size, self.data.pad_id)
        d = self.data
        per_micro = cfg.data.max_tokens // cfg.trainer.grad_accum
        self.batches = TokenBatches(d.splits["train"], per_micro, d.pad_id, d.bos_id, d.eos_id,
                                    seed=cfg.trainer.seed, shuffle=True, device=device, rank=dist.rank,
                                    world=dist.world)
        self.train_iter = iter(self.batches)

    def next_batch(self):
        return next(self.train_iter)

    def n_tokens(self, batch) -> int:
        return int(batch["n_tokens"])

    def loss(self, model, batch, all_aux: bool) -> tuple:
        """Label-smoothed cross-entropy per real target token (train/loss), plus aux terms over real tokens.

        Under data parallelism the slices of a batch hold different numbers of tokens: each rank divides its sum by
        the global count / ranks, so the mean over ranks that DDP takes is the per-token mean of the global batch."""
        logits, routings = model(batch["src"], batch["tgt_in"])
        target = batch["tgt_out"]
        n = global_sum((target != self.data.pad_id).sum()).clamp_min(1) / self.dist.world
        ce = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=self.data.pad_id,
                             label_smoothing=self.label_smoothing, reduction="sum") / n
        aux = aux_losses(routings, self.aux_cfg, all_aux)
        return ce + weighted_aux(aux, self.aux_cfg), ce, aux, routings

    @torch.no_grad()
    def evaluate(self, forward, split: str, prefix: str, autocast, final: bool = False, stop=None) -> dict:
        """NLL per target token over the split, and BLEU / chrF of the decoded split (beam search at the end of
        training, greedy or the configured val beam during it; the first eval.max_sentences sentences where set).
        Under data parallelism each rank takes its share of the batches; sums and hypotheses are gathered. A signal
        in `stop` (the trainer's StopSignals) ends it before the next batch (EvaluationStopped)."""
        from moa_train.metrics.bleu import corpus_scores, tokenized_bleu

        e, model = self.cfg.eval, self.model
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
        out = {f"{prefix}/loss": loss, f"{prefix}/ppl": math.exp(min(loss, 50.0)), f"{prefix}/bleu": scores["bleu"],
               f"{prefix}/chrf": scores["chrf"], f"{prefix}/bleu_tok": tokenized_bleu(hyps, decoded.tgt_text)}
        if n < len(data):
            out[f"{prefix}/bleu_sentences"] = n
            log.info("%s: BLEU and chrF on the first %d of %d sentences (eval.max_sentences)", prefix, n, len(data))
        self.last_signature = scores["bleu_signature"]
        return out

    def _my_batches(self, data, desc: str, stop=None):
        """This rank's share of the split's batches (length-sorted, as many rounds on every rank); a signal in
        `stop` ends them."""
        from moa_train.data.translation import TokenBatches

        d = self.data
        batches = TokenBatches(data, self.cfg.data.max_tokens, d.pad_id, d.bos_id, d.eos_id, shuffle=False,
                               device=self.device)
        share = rank_share(batches, self.dist)
        # translation runs use DDP: no collective in the forward, so a rank skips the batches of others
        for batch, mine in progress(share, desc=desc, unit="batch", total=-(-len(batches) // self.dist.world)):
            check_stop(stop)
            if mine:
                yield batch

    def _nll(self, forward, data, prefix: str, autocast, stop=None) -> float:
        """Cross-entropy per real target token over the whole split (every rank's sums gathered)."""
        total, count = 0.0, 0
        for batch in self._my_batches(data, f"eval {prefix} (loss)", stop):
            with autocast():
                logits, _ = forward(batch["src"], batch["tgt_in"])
            total += F.cross_entropy(logits.flatten(0, 1).float(), batch["tgt_out"].flatten(),
                                     ignore_index=self.data.pad_id, reduction="sum").item()
            count += int(batch["n_tokens"])
        total, count = global_sum(torch.tensor([total, count], dtype=torch.float64, device=self.device)).tolist()
        return total / max(count, 1)

    def _decode(self, data, desc: str, beam: int, autocast, stop=None) -> list:
        """Detokenised hypotheses of every sentence of `data`, in order (every rank's gathered)."""
        from moa_train.models.search import beam_search, greedy_search, max_output_len

        d, e, model = self.data, self.cfg.eval, self.model
        hyps = {}  # sentence index -> detokenised hypothesis
        for batch in self._my_batches(data, f"eval {desc}", stop):
            src_mask = batch["src"] != d.pad_id
            max_len = min(max_output_len(src_mask, e.max_len_a, e.max_len_b), self.cfg.model.max_seq_len - 1)
            with autocast():
                if beam == 1:
                    out = greedy_search(model, batch["src"], src_mask, d.bos_id, d.eos_id, d.pad_id, max_len)
                else:
                    out = beam_search(model, batch["src"], src_mask, d.bos_id, d.eos_id, d.pad_id, max_len,
                                      beam=beam, lenpen=e.lenpen)
            for i, ids in zip(batch["index"].tolist(), out):
                hyps[i] = d.decode(ids)
        hyps = {i: text for part in gather_objects(hyps, self.dist) for i, text in part.items()}
        return [hyps[i] for i in range(len(data.src))]

    def flops_per_token(self) -> int:
        """At the mean target length of the training pairs (attention cost grows with it)."""
        return self.model.flops_per_token(round(float(self.batches.tgt_len.mean())))  # lengths with EOS


def first_pairs(split, n: int):
    """The first `n` sentence pairs of a split (in file order)."""
    from dataclasses import replace

    return replace(split, src=split.src[:n], tgt=split.tgt[:n], src_text=split.src_text[:n],
                   tgt_text=split.tgt_text[:n])


def make_task(cfg, device: torch.device, dist: Dist = Dist()):
    return (TranslationTask if cfg.data.name in TRANSLATION_DATA else LMTask)(cfg, device, dist)
