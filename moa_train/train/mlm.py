"""Masked language modelling (BERT / RoBERTa): an encoder-only, bidirectional Transformer over the
attention registry (models/encoder.py) on the LM corpora's token streams, with a `[MASK]` id
appended after the data's vocabulary (the tokenizer and the token cache stay the LM's).

Masking is the task's: `task.mask_prob` of the non-special tokens of a window are selected for
prediction; of those, `task.mask_token` become [MASK], `task.random_token` a random token of the
data's vocabulary, the rest stay (BERT's 80/10/10). Training windows are masked afresh each time
they are drawn (RoBERTa's dynamic masking), from a generator whose state the checkpoint keeps;
validation and test windows and masks come from `task.eval_seed` alone, so their losses compare
across evaluations and runs. The loss is the cross-entropy over the selected positions only:
val/loss is nats per masked token, val/ppl its exponential.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moa_train.data.batches import RandomWindows, sequential_windows
from moa_train.models.routing import aux_losses, weighted_aux
from moa_train.progress import progress
from moa_train.schema import TaskConfig
from moa_train.train.distributed import Dist, global_sum, rank_share
from moa_train.train.evaluate import EVAL_SEED
from moa_train.train.preemption import check_stop
from moa_train.train.tasks import LMTask
from moa_train.validation import check

IGNORE = -100  # the target of a position that is not predicted (F.cross_entropy's ignore_index)


@dataclass
class MLMConfig(TaskConfig):
    """Masked language modelling: the masking recipe (BERT's)."""

    mask_prob: float = 0.15  # share of the non-special tokens selected for prediction
    mask_token: float = 0.8  # of the selected: the share replaced by [MASK]
    random_token: float = 0.1  # of the selected: the share replaced by a random token (rest kept)
    eval_seed: int = EVAL_SEED  # the validation and test masks' seed (the same at every evaluation)


def special_ids(data) -> list:
    """Ids a mask never selects: the tokenizer's special symbols (a word vocabulary's <eos>, a
    BPE's special tokens)."""
    from moa_train.data.tokenizer import tokenizer_from_json

    if data.tokenizer_file is None:
        return []
    tok = tokenizer_from_json(data.tokenizer_file.read_text(encoding="utf-8"))
    if hasattr(tok, "stoi"):
        return [tok.stoi[s] for s in ("<eos>",) if s in tok.stoi]
    added = getattr(getattr(tok, "tok", None), "get_added_tokens_decoder", dict)()
    return sorted(added)


def draw(generator: torch.Generator, shape: tuple, n_ids: int) -> tuple:
    """The random numbers that mask windows of `shape`: (select uniforms, replace uniforms, random
    ids below n_ids), drawn on the CPU so that a mask does not depend on the device."""
    return (
        torch.rand(shape, generator=generator),
        torch.rand(shape, generator=generator),
        torch.randint(n_ids, shape, generator=generator),
    )


def mask_tokens(x: torch.Tensor, draws: tuple, task, mask_id: int, special) -> tuple:
    """(inputs, targets) of windows x: the selected positions replaced as the recipe says, targets
    the original ids there and IGNORE elsewhere."""
    select, kind, random_ids = (d.to(x.device) for d in draws)
    maskable = ~torch.isin(x, torch.as_tensor(special, dtype=x.dtype, device=x.device))
    selected = maskable & (select < task.mask_prob)
    as_mask = selected & (kind < task.mask_token)
    as_random = selected & (kind >= task.mask_token) & (kind < task.mask_token + task.random_token)
    inputs = torch.where(as_mask, mask_id, torch.where(as_random, random_ids, x))
    return inputs, torch.where(selected, x, IGNORE)


class MaskedWindows(RandomWindows):
    """Random training windows masked afresh at every draw (dynamic masking); the masks' generator
    is checkpointed with the windows'. Every rank draws the global batch's masks and keeps its
    slice, as with the windows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_generator = torch.Generator().manual_seed(args[3] + 1)  # trainer.seed + 1

    def masked(self, task, mask_id: int, special) -> tuple:
        x, _ = self.windows_at(self.next_starts())
        draws = draw(self.mask_generator, (self.batch_size, self.block_size), mask_id)
        mine = tuple(d.view(self.world, -1, self.block_size)[self.rank] for d in draws)
        return mask_tokens(x, mine, task, mask_id, special)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "masks": self.mask_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.mask_generator.set_state(state["masks"].cpu())


class MLMTask(LMTask):
    """Encoder-only masked LM on a token stream: random windows, BERT masking, cross-entropy over
    the masked positions."""

    cuda_graphs_ok = False  # a batch is its masked windows, not offsets gathered in the graph
    metrics = ("val/loss", "val/ppl", "test/loss", "test/ppl")
    headline = ("loss", "ppl")
    summary_keys = ("val/loss", "val/ppl", "test/loss", "test/ppl")
    added_ids = 1  # [MASK], after the data's ids
    fixed_keys = ("task.mask_prob", "task.mask_token", "task.random_token", "task.eval_seed")
    windows = MaskedWindows

    @staticmethod
    def check(cfg, world_size: int) -> None:
        LMTask.check(cfg, world_size)
        k = cfg.task
        check(0 < k.mask_prob < 1, "task.mask_prob", f"must be in (0, 1), got {k.mask_prob}")
        for key in ("mask_token", "random_token"):
            check(0 <= k[key] <= 1, f"task.{key}", f"must be in [0, 1], got {k[key]}")
        check(
            k.mask_token + k.random_token <= 1,
            "task.random_token",
            f"{k.random_token} + task.mask_token={k.mask_token} exceed 1 (the selected tokens "
            "replaced); BERT: 0.1 + 0.8",
        )

    @staticmethod
    def build_model(model_cfg, vocab_size: int, pad_id=None):
        from moa_train.models.encoder import MaskedLM

        return MaskedLM(model_cfg, vocab_size, pad_id)

    def __init__(self, cfg, device: torch.device, dist: Dist = Dist()):
        super().__init__(cfg, device, dist)
        self.mask_id = self.data.vocab_size
        self.special = special_ids(self.data)

    def next_batch(self) -> tuple:
        """(inputs, targets) of the next training windows, masked."""
        return self.batches.masked(self.cfg.task, self.mask_id, self.special)

    def n_tokens(self, batch) -> int:
        return batch[0].numel() * self.dist.world

    def loss(self, model, batch, all_aux: bool) -> tuple:
        """(total loss, CE per masked token, unweighted aux terms, routing records)."""
        inputs, targets = batch
        logits, routings = model(inputs)
        nll = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        ce = nll / (targets != IGNORE).sum().clamp_min(1)
        aux = aux_losses(routings, self.aux_cfg, all_aux)
        return ce + weighted_aux(aux, self.aux_cfg, targets.numel()), ce, aux, routings

    def eval_batches(self, split: str):
        """(inputs, targets) of a split's evaluation windows, the same at every call: random
        windows (trainer.eval_iters, the LM's seed) or a full pass, masked from task.eval_seed."""
        t, data = self.cfg.trainer, self.data.splits[split]
        batch = t.eval_batch_size or t.batch_size
        if t.eval_iters is None:
            windows = (
                x for x, _ in sequential_windows(data.tokens, batch, t.block_size, self.device)
            )
        else:
            sampler = RandomWindows(data.tokens, batch, t.block_size, EVAL_SEED, self.device)
            windows = (sampler.next()[0] for _ in range(t.eval_iters))
        generator = torch.Generator().manual_seed(self.cfg.task.eval_seed)
        for x in windows:
            draws = draw(generator, tuple(x.shape), self.mask_id)
            yield mask_tokens(x, draws, self.cfg.task, self.mask_id, self.special)

    @torch.no_grad()
    def evaluate(
        self, forward, split: str, prefix: str, autocast, final: bool = False, stop=None
    ) -> dict:
        """Nats per masked token over the split's fixed masked windows (each rank its share, the
        sums all-reduced) and its perplexity."""
        t, model = self.cfg.trainer, self.model
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)
        rounds = t.eval_iters and -(-t.eval_iters // self.dist.world)
        batches = rank_share(self.eval_batches(split), self.dist)
        for (inputs, targets), mine in progress(
            batches, desc=f"eval {prefix}", unit="batch", total=rounds
        ):
            check_stop(stop)
            with autocast():
                logits, _ = forward(inputs)
            if mine:
                sums[0] += F.cross_entropy(
                    logits.flatten(0, 1).float(),
                    targets.flatten(),
                    ignore_index=IGNORE,
                    reduction="sum",
                ).double()
                sums[1] += (targets != IGNORE).sum()
        model.train(was_training)
        total, count = global_sum(sums).tolist()
        loss = total / max(count, 1)
        return {f"{prefix}/loss": loss, f"{prefix}/ppl": math.exp(min(loss, 50.0))}
