"""Block coordinate descent (BCD) for a model whose gate trains apart from its experts (MAE, Peng et
al. 2020): the experts update under the main optimizer with the gate fixed, and in gate phases the
gate updates under its own plain SGD with the experts fixed.

The schedule (keys of the variant's config, `model.gate_*`): step s (0-based) is a gate step when
s % gate_every >= gate_every - gate_steps, so each cycle of gate_every steps ends with gate_steps
gate steps; the rest are expert steps. The gate's parameters are those with the router role
(models/roles.py); they leave the main optimizer's groups. Every step runs the same forward and
backward (the gradients of the block that does not move are computed and dropped: simpler than
switching requires_grad, which would recompile a compiled step); the lr schedule, the step counter
and the data advance on both kinds of step.

A captured CUDA-graph step replays one optimizer update, and BCD alternates two, so with BCD the
step runs eagerly (`trainer.cuda_graphs` is then ignored, said in one line at start-up).
"""

from __future__ import annotations

import torch

from moa_train.models.roles import ROUTER, params_with

NO_GRAPH = (
    "model.gate_training=bcd: trainer.cuda_graphs ignored, the step runs eagerly (a captured step "
    "replays one optimizer update; block coordinate descent alternates the experts' and the gate's)"
)


def wants_bcd(model_cfg) -> bool:
    """Whether the model config asks for block coordinate descent."""
    return getattr(model_cfg, "gate_training", "joint") == "bcd"


class GatePhases:
    """The gate's parameters, its SGD optimizer and the phase schedule."""

    def __init__(self, model: torch.nn.Module, model_cfg):
        self.every, self.steps = int(model_cfg.gate_every), int(model_cfg.gate_steps)
        self.params = params_with(model, ROUTER)
        self.ids = {id(p) for p in self.params}
        # the experts: every other parameter (listed once, not per step)
        self.experts = [p for p in model.parameters() if id(p) not in self.ids]
        # plain SGD, no momentum: the paper's choice for the gate (not a momentum method)
        self.optimizer = torch.optim.SGD(self.params, lr=float(model_cfg.gate_lr), momentum=0.0)

    def is_gate_step(self, step: int) -> bool:
        return step % self.every >= self.every - self.steps

    def block(self, gate_step: bool) -> list:
        """The parameters a step moves (its gradient norm and clipping cover these alone)."""
        return self.params if gate_step else self.experts

    def step(self, bad: torch.Tensor) -> None:
        """The gate's update unless the step is bad (a host read: BCD runs eagerly)."""
        if not bool(bad):
            self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
