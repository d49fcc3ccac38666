"""Evaluation of an LM on a split: random windows (trainer.eval_iters) or a full pass (eval_iters:
null); under data parallelism each rank evaluates its share of the batches and the sums are
all-reduced."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from moa_train.data.batches import RandomWindows, sequential_windows
from moa_train.progress import progress
from moa_train.train.distributed import Dist, global_sum, rank_share
from moa_train.train.preemption import check_stop

# the same eval windows for every model and training seed, so rows compare on equal data
EVAL_SEED = 1234


def split_metrics(prefix: str, loss: float, split) -> dict:
    """Loss in nats per token and its conversions: perplexity, bits per character, word-level
    perplexity."""
    return {
        f"{prefix}/loss": loss,
        f"{prefix}/ppl": math.exp(min(loss, 50.0)),
        f"{prefix}/bpc": loss / math.log(2) / split.chars_per_token,
        f"{prefix}/word_ppl": math.exp(min(loss / split.words_per_token, 50.0)),
    }


@torch.no_grad()
def evaluate(
    model,
    split,
    prefix: str,
    batch_size: int,
    block_size: int,
    eval_iters,
    device,
    autocast=nullcontext,
    dist: Dist = Dist(),
    stop=None,
) -> dict:
    """`stop`: a StopSignals whose signal ends the evaluation (EvaluationStopped) before the next
    batch."""
    was_training = model.training
    model.eval()
    if eval_iters is None:
        batches = sequential_windows(split.tokens, batch_size, block_size, device)
    else:
        sampler = RandomWindows(split.tokens, batch_size, block_size, EVAL_SEED, device)
        batches = (sampler.next() for _ in range(eval_iters))
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # summed NLL, target tokens
    rounds = eval_iters and -(-eval_iters // dist.world)
    for (x, y), mine in progress(
        rank_share(batches, dist), desc=f"eval {prefix}", unit="batch", total=rounds
    ):
        check_stop(stop)
        with autocast():
            logits, _ = model(x)
        if mine:
            sums[0] += F.cross_entropy(
                logits.flatten(0, 1).float(), y.flatten(), reduction="sum"
            ).double()
            sums[1] += y.numel()
    model.train(was_training)
    total, count = global_sum(sums).tolist()
    return split_metrics(prefix, total / count, split)
