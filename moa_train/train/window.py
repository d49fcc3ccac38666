"""The train losses between two log steps, summed on the device over the steps that were applied."""

from __future__ import annotations

import torch


class LossWindow:
    """Sums of the CE and the aux terms since the last log step, leaving out skipped (non-finite)
    steps.

    Part of the checkpoint: a run stopped and resumed between two log steps logs the same averages
    at the next one as a run that was never stopped."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.ce, self.applied, self.aux = 0.0, 0, {}

    def add(self, ce: torch.Tensor, aux: dict, bad: torch.Tensor) -> None:
        ok = ~bad
        self.ce = self.ce + torch.where(ok, ce, 0.0)
        self.applied = self.applied + ok
        # (sum, count) per term: z and cv may be computed on log steps only
        for k, v in aux.items():
            total, count = self.aux.get(k, (0.0, 0))
            self.aux[k] = (total + torch.where(ok, v, 0.0), count + ok)

    def pop(self) -> dict:
        """The means over the applied steps (NaN where every step was skipped); a new window
        starts."""
        means = {
            "train/loss": self.ce / self.applied,
            **{f"train/aux/{k}": total / count for k, (total, count) in self.aux.items()},
        }
        self.reset()
        return means

    def state_dict(self) -> dict:
        return {"ce": self.ce, "applied": self.applied, "aux": self.aux}

    def load_state_dict(self, state: dict) -> None:
        self.ce, self.applied, self.aux = state["ce"], state["applied"], state["aux"]
