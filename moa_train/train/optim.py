"""AdamW with nanoGPT's parameter groups plus a router group, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from moa_train.models.roles import NO_DECAY, ROUTER, param_roles


def param_groups(model: torch.nn.Module, cfg, exclude: frozenset = frozenset()) -> list:
    """By the roles the modules declare (models/roles.py): no_decay for norms and biases; router for
    a router's parameters, with its own lr multiplier and weight decay (its norms and biases none);
    decay for the rest. `exclude`: ids of parameters another optimizer updates (train/bcd.py)."""
    decay, no_decay, router, router_no_decay = [], [], [], []
    roles = param_roles(model)
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        keep = NO_DECAY in roles[name]
        if ROUTER in roles[name]:
            (router_no_decay if keep else router).append(p)
        else:
            (no_decay if keep else decay).append(p)
    params = {
        "decay": decay,
        "no_decay": no_decay,
        "router": router,
        "router_no_decay": router_no_decay,
    }
    groups = [
        {"name": name, "params": params[name], **hp} for name, hp in group_settings(cfg).items()
    ]
    return [g for g in groups if g["params"]]


def group_settings(cfg) -> dict:
    """Each parameter group's base lr and weight decay under optim config `cfg`."""
    router_lr = cfg.lr * cfg.router_lr_mult
    return {
        "decay": {"weight_decay": cfg.weight_decay, "lr": cfg.lr},
        "no_decay": {"weight_decay": 0.0, "lr": cfg.lr},
        "router": {"weight_decay": cfg.router_weight_decay, "lr": router_lr},
        "router_no_decay": {"weight_decay": 0.0, "lr": router_lr},
    }


def apply_settings(optimizer: torch.optim.Optimizer, scheduler, cfg) -> None:
    """After a resume: the config's lr, betas, eps and weight decay replace those the loaded
    optimizer state carried (load_state_dict restores the saved ones), and the schedule continues
    from the new base lrs."""
    settings = group_settings(cfg)
    # the current config's schedule, at the resumed step
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for i, group in enumerate(optimizer.param_groups):
        hp = settings[group["name"]]
        group.update(
            weight_decay=hp["weight_decay"],
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            initial_lr=hp["lr"],
        )
        lr = hp["lr"] * factor
        # capturable: a CUDA graph reads this tensor, update in place
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
        scheduler.base_lrs[i] = hp["lr"]
    scheduler._last_lr = [float(g["lr"]) for g in optimizer.param_groups]


def build_optimizer(
    model: torch.nn.Module,
    cfg,
    device: torch.device,
    capturable: bool = False,
    exclude: frozenset = frozenset(),
):
    """AdamW over param_groups (fused unless optim.fused=false: the fused kernel takes the skip flag
    of a non-finite step on the device, see train/guard.py); `capturable` (for a CUDA-graph step)
    keeps its step counts and the learning rates as device tensors, which the schedule then updates
    in place."""
    groups = param_groups(model, cfg, exclude)
    if capturable:
        for g in groups:
            g["lr"] = torch.tensor(g["lr"], device=device)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=cfg.fused,
        capturable=capturable,
    )


def lr_factor(step: int, cfg, max_steps: int) -> float:
    """Multiplier of each group's base lr at `step` (0-based)."""
    warmup = cfg.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))  # cosine
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, max_steps)
    )
