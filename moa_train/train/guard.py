"""Optimizer steps with a non-finite loss or gradient are skipped, decided on the device.

A step is bad when its loss (summed over its micro-batches) or its gradient norm is NaN or infinite.
The fused AdamW takes that flag as its `found_inf` argument (the path torch's GradScaler uses): a
bad step leaves the weights, both moments and AdamW's own step count as they were, without a host
sync, also inside a captured CUDA graph. The non-fused AdamW (optim.fused=false) has no such
argument: there the flag is read on the host every step (free on a CPU, one sync per step on a GPU;
validation refuses it with trainer.cuda_graphs).

A skipped step is still a step: the step counter, the data position and the lr schedule advance as
if it had been applied, so the schedule and the checkpoint steps of a run do not depend on how many
of its steps were skipped.

The counters stay on the device; the trainer reads them when it logs (`train/skipped_steps`, a
running total) and before it writes a checkpoint, and stops with DivergedError once
`trainer.max_bad_steps` steps in a row were bad. The limit is therefore noticed at the first log or
save step after it is reached (at most log_interval - 1 more steps, all of them skipped), and no
checkpoint is written from then on.

A stop names the run's recovery point: its newest *sane* checkpoint (`sane`), never merely its
latest one; a finite but huge learning rate leaves checkpoints of finite weights of 1e28 and a NaN
validation loss, from which a resume fails the same way.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


# AdamW moves a weight by about lr per step (|m / sqrt(v)| <= ~1), so a weight beyond 1e4 took lr x
# steps > 1e4: no schedule that trains gets there (lr 1e-3 for 1e6 steps: 1e3), while trained
# transformers hold weights of order 0.01-10. A diverging run passes it within a few steps.
MAX_SANE_WEIGHT = 1e4
SANE = f"finite weights of at most {MAX_SANE_WEIGHT:g} and a finite validation loss"


def sane(large_weights: int, val: float | None) -> bool:
    """Whether a checkpoint is a recovery point: no weight above MAX_SANE_WEIGHT in magnitude
    (`large_weights` of them; non-finite ones are never written) and the latest validation before
    it, if the run has one, finite."""
    return large_weights == 0 and (val is None or math.isfinite(val))


def recovery(last_sane) -> str:
    """What a diverged run's stop message advises: resume from its newest sane checkpoint, or start
    over where it has none."""
    remedy = "a lower optim.lr, a trainer.grad_clip or trainer.precision=fp32"
    if last_sane is None:
        return (
            f"the last good checkpoint is none (no checkpoint of this run has {SANE}); start over "
            f"with {remedy}"
        )
    return (
        f"the last good checkpoint is {last_sane} ({SANE}); resume from it with "
        f"trainer.resume={last_sane} and {remedy}"
    )


class DivergedError(RuntimeError):
    """The run stopped after trainer.max_bad_steps non-finite steps in a row: one line, exit code
    3."""


class NonFiniteGuard:
    def __init__(self, optimizer: torch.optim.Optimizer, max_bad_steps: int, device: torch.device):
        self.optimizer, self.max_bad_steps = optimizer, max_bad_steps
        self.fused = bool(optimizer.defaults.get("fused"))
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped, self.streak, self.longest = zero.clone(), zero.clone(), zero.clone()
        self.reported = 0  # `skipped` at the last check, to warn once about new skips

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor, update=None) -> torch.Tensor:
        """The optimizer step, unless `loss` or `grad_norm` is not finite; returns that flag (a bool
        tensor). `update(bad)`, when given, replaces the optimizer's step (a BCD gate step,
        train/bcd.py)."""
        # a NaN or an infinity in either makes the sum non-finite
        bad = ~torch.isfinite(loss + grad_norm)
        self.skipped += bad
        # in place: these tensors are updated by every replay of a captured step
        self.streak.add_(1).mul_(bad)
        torch.maximum(self.longest, self.streak, out=self.longest)
        if update is not None:
            update(bad)
        elif self.fused:
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
        elif not bad:
            self.optimizer.step()
        return bad

    def check(self, step: int, last_sane) -> None:
        """At log and save steps (a host sync): warn about newly skipped steps; raise DivergedError
        once max_bad_steps steps in a row were bad, naming `last_sane` (the newest sane
        checkpoint)."""
        skipped, longest = self.skipped.item(), self.longest.item()
        if skipped > self.reported:
            log.warning(
                "step %d: %d step(s) skipped so far for a non-finite loss or gradient",
                step,
                skipped,
            )
            self.reported = skipped
        if longest >= self.max_bad_steps:
            raise DivergedError(
                f"trainer.max_bad_steps: {longest} steps in a row had a non-finite loss or "
                f"gradient (limit {self.max_bad_steps}), stopped at step {step}; "
                f"{recovery(last_sane)}"
            )

    def state_dict(self) -> dict:
        return {
            "skipped": self.skipped.item(),
            "streak": self.streak.item(),
            "longest": self.longest.item(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("skipped", "streak", "longest"):
            getattr(self, key).fill_(state[key])  # in place, like the updates
        self.reported = state["skipped"]
