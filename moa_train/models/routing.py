"""Routing records, auxiliary losses and routing statistics, shared by every routed attention family.

An attention module returns a `Routing` (or None when it is dense). Everything here works on device tensors and
never calls `.item()`, so the model stays free of graph breaks; the trainer converts to floats only when it logs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

AUX_NAMES = ("balance", "z", "cv")


@dataclass
class Routing:
    probs: Tensor  # (N, C) the router's distribution over C choices, before any gate dropout
    choice_names: tuple  # C names: ("mha", "gqa", "mqa") or ("0", ..., "E-1")
    chosen: Optional[Tensor] = None  # (N, k) selected choices for top-k routers; None for soft mixing
    aux: dict = field(default_factory=dict)  # name -> unweighted scalar loss


def _masked_mean(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean over the token dimension (0), counting only tokens where mask is True."""
    if mask is None:
        return x.mean(0)
    w = mask.to(x.dtype).unsqueeze(-1) if x.dim() > 1 else mask.to(x.dtype)
    return (x * w).sum(0) / w.sum().clamp_min(1.0)


def dispatch_fraction(probs: Tensor, chosen: Optional[Tensor], mask: Optional[Tensor] = None) -> Tensor:
    """Share of selections per choice: counts / (tokens x k); a soft router 'selects' its argmax."""
    if chosen is None:
        chosen = probs.argmax(-1, keepdim=True)
    one_hot = F.one_hot(chosen, probs.shape[-1]).to(probs.dtype).sum(1) / chosen.shape[-1]  # (N, C)
    return _masked_mean(one_hot, mask)


def balance_mse(probs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """MoAS paper: MSE between the batch-mean gates and the uniform 1/C."""
    mean = _masked_mean(probs, mask)
    return ((mean - 1.0 / probs.shape[-1]) ** 2).mean()


def balance_switch(probs: Tensor, chosen: Optional[Tensor], mask: Optional[Tensor] = None) -> Tensor:
    """Switch-Transformer balance: C * sum_i f_i * P_i; 1 when uniform, C when collapsed."""
    frac = dispatch_fraction(probs, chosen, mask).detach()
    return probs.shape[-1] * (frac * _masked_mean(probs, mask)).sum()


def z_loss(logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return _masked_mean(torch.logsumexp(logits.float(), -1) ** 2, mask)


def cv_squared(probs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Squared coefficient of variation of expert importance (sum of router probabilities per choice)."""
    importance = _masked_mean(probs, mask)
    return importance.var() / (importance.mean() ** 2 + 1e-10)


def router_aux(logits: Tensor, probs: Tensor, chosen: Optional[Tensor], balance_type: str,
               mask: Optional[Tensor] = None) -> dict:
    """The three aux terms every routed module reports; coefficients are applied by the trainer."""
    balance = balance_mse(probs, mask) if balance_type == "mse" else balance_switch(probs, chosen, mask)
    return {"balance": balance, "z": z_loss(logits, mask), "cv": cv_squared(probs, mask)}


def reduce_aux(routings: list, layer_reduce: str) -> dict:
    """Combine each aux term over the routed sites: mean (MoAS paper) or sum (MoA code)."""
    records = [r for r in routings if r is not None and r.aux]
    if not records:
        return {}
    out = {}
    for name in AUX_NAMES:
        total = torch.stack([r.aux[name].float() for r in records]).sum()
        out[name] = total / len(records) if layer_reduce == "mean" else total
    return out


def weighted_aux(aux: dict, coefs) -> Tensor | float:
    """sum_name coef_name * aux[name]: the one place where coefficients meet aux terms."""
    total = 0.0
    for name, value in aux.items():
        coef = float(coefs[f"{name}_coef"])
        if coef:
            total = total + coef * value
    return total


def entropy(probs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean over tokens of the entropy (nats) of each token's routing distribution."""
    p = probs.float()
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    return _masked_mean(ent, mask)


def utilisation(probs: Tensor, chosen: Optional[Tensor], mask: Optional[Tensor] = None) -> Tensor:
    """Share per choice, summing to 1: probability mass for soft routers, selections / (tokens x k) for top-k."""
    if chosen is None:
        return _masked_mean(probs.float(), mask)
    return dispatch_fraction(probs.float(), chosen, mask)


def routing_metrics(sites: list, routings: list, mask: Optional[Tensor] = None) -> dict:
    """Turn (site name, Routing) pairs into the flat metric dict: routing/entropy/<site>, routing/util/<site>/<c>."""
    out = {}
    for site, r in zip(sites, routings):
        if r is None:
            continue
        out[f"routing/entropy/{site}"] = entropy(r.probs, mask)
        util = utilisation(r.probs, r.chosen, mask)
        for i, name in enumerate(r.choice_names):
            out[f"routing/util/{site}/{name}"] = util[i]
    return out


def max_entropy(n_choices: int) -> float:
    return math.log(n_choices)
