"""Routing records, auxiliary losses and routing statistics, shared by every routed attention
family.

An attention module returns a `Routing` (or None when it is dense). Everything here works on device
tensors and never calls `.item()`, so the model stays free of graph breaks; the trainer converts to
floats only when it logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moa_train.collectives import global_sum, world_size


@dataclass
class Routing:
    probs: Tensor  # (N, C) the router's distribution over C choices, before any gate dropout
    choice_names: tuple  # C names: ("mha", "gqa", "mqa") or ("0", ..., "E-1")
    # (N, k) selected choices for top-k routers; None for soft mixing
    chosen: Tensor | None = None
    logits: Tensor | None = None  # (N, C) router logits (for the z-loss)
    # (N,) True for real tokens: padding is left out of aux losses and statistics
    mask: Tensor | None = None
    # (C,) K/V heads a token stores under each choice (moas_kv): aux kv_heads
    cost: Tensor | None = None
    # target of the mean cost over tokens and costed sites (moas_kv): aux kv_budget
    budget: float | None = None
    # False: statistics only, no aux terms (a parameter-free router: moh's query_norm gating)
    aux_terms: bool = True


def detached(routings: list) -> list:
    """The records without autograd history: kept for metrics, they must not keep a step's graph
    alive."""
    return [
        None
        if r is None
        else Routing(
            r.probs.detach(),
            r.choice_names,
            r.chosen,
            None if r.logits is None else r.logits.detach(),
            r.mask,
            r.cost,
            r.budget,
            r.aux_terms,
        )
        for r in routings
    ]


# Every function below takes tokens on dim -2 of (..., N, C) tensors (dim -1 of (..., N)), so the
# aux terms of all layers are computed in one batched call on stacked records: a few kernels per
# step instead of a few per layer.


def _token_mean(x: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """Mean over the token dimension, counting only tokens where mask (N,) is True. Under data
    parallelism it is the mean over every rank's tokens (the global batch): sums and counts are
    all-reduced, differentiably, so the aux losses, their gradients and the routing statistics are
    those of the global batch."""
    # every rank holds the same number of tokens (the global batch is split evenly): no count to sum
    if mask is None:
        return global_sum(x.sum(dim)) / (x.shape[dim] * world_size())
    w = mask.to(x.dtype)
    w = w.unsqueeze(-1) if dim == -2 else w
    return global_sum((x * w).sum(dim)) / global_sum(w.sum(dim)).clamp_min(1.0)


def dispatch_fraction(probs: Tensor, chosen: Tensor | None, mask: Tensor | None = None) -> Tensor:
    """Share of selections per choice: counts / (tokens x k); a soft router 'selects' its argmax."""
    if chosen is None:
        chosen = probs.argmax(-1, keepdim=True)
    # (..., N, C)
    one_hot = F.one_hot(chosen, probs.shape[-1]).to(probs.dtype).sum(-2) / chosen.shape[-1]
    return _token_mean(one_hot, mask, -2)


def balance_mse(probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """MoAS paper: MSE between the batch-mean gates and the uniform 1/C."""
    mean = _token_mean(probs, mask, -2)
    return ((mean - 1.0 / probs.shape[-1]) ** 2).mean(-1)


def balance_switch(probs: Tensor, chosen: Tensor | None, mask: Tensor | None = None) -> Tensor:
    """Switch-Transformer balance: C * sum_i f_i * P_i; 1 when uniform, C when collapsed."""
    frac = dispatch_fraction(probs, chosen, mask).detach()
    return probs.shape[-1] * (frac * _token_mean(probs, mask, -2)).sum(-1)


def balance_switch_k(probs: Tensor, chosen: Tensor | None, mask: Tensor | None = None) -> Tensor:
    """The MoH code's balance: C * sum_i f_i P_i with f_i the share of tokens selecting choice i
    (summing to k, not 1): k times balance_switch; k when uniform."""
    k = 1 if chosen is None else chosen.shape[-1]
    return k * balance_switch(probs, chosen, mask)


def z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return _token_mean(torch.logsumexp(logits.float(), -1) ** 2, mask, -1)


def cv_squared(probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared coefficient of variation of expert importance (sum of router probabilities per
    choice)."""
    importance = _token_mean(probs, mask, -2)
    return importance.var(-1) / (importance.mean(-1) ** 2 + 1e-10)


def gate_matrix(probs: Tensor, chosen: Tensor | None) -> Tensor:
    """(..., N, C) the gates each token gives each choice: its router probability where chosen
    (top-k routers, as softmax_all gating uses them), zero elsewhere; soft routers: the
    probabilities."""
    if chosen is None:
        return probs
    return torch.zeros_like(probs).scatter(-1, chosen, probs.gather(-1, chosen))


def kv_heads(records: list) -> Tensor:
    """Stored K/V heads per token, averaged over tokens and the costed sites (moas_kv): each token's
    straight-through gates (the hard choice's value, the probabilities' gradient) times the heads
    each choice stores."""
    per_site = []
    for r in records:
        gates = (
            r.probs
            if r.chosen is None
            else (
                torch.zeros_like(r.probs).scatter(-1, r.chosen, 1.0 / r.chosen.shape[-1])
                + r.probs
                - r.probs.detach()
            )
        )
        per_site.append(_token_mean(gates @ r.cost.to(gates.dtype), r.mask, -1))
    return torch.stack(per_site).mean()


def _stack(records: list, field_name: str) -> Tensor | None:
    values = [getattr(r, field_name) for r in records]
    return None if values[0] is None else torch.stack(values)


def aux_losses(routings: list, aux_cfg, all_terms: bool = True) -> dict:
    """Unweighted aux terms reduced over the routed sites (mean as in the MoAS paper, sum as in the
    MoA code).

    `balance` is always computed (it is the usual loss); `z` and `cv` only when weighted or
    `all_terms` (log steps), so a step whose coefficients are zero launches no kernels for them.
    Sites of equal shape are stacked and computed together."""
    records = [r for r in routings if r is not None and r.aux_terms]
    if not records:
        return {}
    # records of equal shape and kind sharing one mask object (`is`: no id(), which dynamo refuses)
    groups: list = []
    for r in records:
        for g in groups:
            same_kind = g[0].probs.shape == r.probs.shape and (g[0].chosen is None) == (
                r.chosen is None
            )
            if same_kind and g[0].mask is r.mask:
                g.append(r)
                break
        else:
            groups.append([r])
    wanted = {
        "balance": True,
        "z": all_terms or bool(aux_cfg.z_coef),
        "cv": all_terms or bool(aux_cfg.cv_coef),
    }
    per_layer: dict = {name: [] for name, on in wanted.items() if on}
    for group in groups:
        probs, chosen, logits = (
            _stack(group, "probs"),
            _stack(group, "chosen"),
            _stack(group, "logits"),
        )
        mask = group[0].mask  # shared by the group
        if aux_cfg.balance_type == "mse":
            per_layer["balance"].append(balance_mse(probs, mask))
        elif aux_cfg.balance_type == "switch_k":
            per_layer["balance"].append(balance_switch_k(probs, chosen, mask))
        else:
            per_layer["balance"].append(balance_switch(probs, chosen, mask))
        # z_tokens=all: padding too (the MoA code does not mask it)
        if "z" in per_layer and logits is not None:
            z_mask = (
                torch.ones_like(mask) if aux_cfg.z_tokens == "all" and mask is not None else mask
            )
            per_layer["z"].append(z_loss(logits, z_mask))
        if "cv" in per_layer:
            per_layer["cv"].append(
                cv_squared(gate_matrix(probs, chosen) if aux_cfg.cv_of == "gates" else probs, mask)
            )
    out = {}
    for name, values in per_layer.items():
        if values:
            v = torch.cat(values).float()
            out[name] = v.mean() if aux_cfg.layer_reduce == "mean" else v.sum()
    costed = [r for r in records if r.cost is not None]
    if costed:  # a statistic (no coefficient) and, with a budget, its loss relu(heads - budget)^2
        out["kv_heads"] = kv_heads(costed)
        if costed[0].budget is not None:
            out["kv_budget"] = F.relu(out["kv_heads"] - costed[0].budget) ** 2
    return out


def weighted_aux(aux: dict, coefs, n_tokens: Tensor | float = 1.0) -> Tensor | float:
    """sum_name coef_name * aux[name]: the one place where coefficients meet aux terms; divided by
    `n_tokens` (the micro-batch's target tokens) where `coefs.divide_by_tokens` asks for the MoA
    code's normalisation."""
    total = 0.0
    for name, value in aux.items():
        coef = float(getattr(coefs, f"{name}_coef", 0.0))  # statistics (kv_heads) have none
        if coef:
            total = total + coef * value
    return total / n_tokens if coefs.divide_by_tokens and not isinstance(total, float) else total


def entropy(probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over tokens of the entropy (nats) of each token's routing distribution."""
    p = probs.float()
    return _token_mean(-(p * torch.log(p.clamp_min(1e-12))).sum(-1), mask, -1)


def utilisation(probs: Tensor, chosen: Tensor | None, mask: Tensor | None = None) -> Tensor:
    """Share per choice, summing to 1: probability mass for soft routers, selections / (tokens x k)
    for top-k."""
    if chosen is None:
        return _token_mean(probs.float(), mask, -2)
    return dispatch_fraction(probs.float(), chosen, mask)


def routing_metrics(sites: list, routings: list) -> dict:
    """Turn (site name, Routing) pairs into the flat metric dict: routing/entropy/<site>,
    routing/util/<site>/<c>."""
    out = {}
    for site, r in zip(sites, routings, strict=True):
        if r is None:
            continue
        out[f"routing/entropy/{site}"] = entropy(r.probs, r.mask)
        util = utilisation(r.probs, r.chosen, r.mask)
        for i, name in enumerate(r.choice_names):
            out[f"routing/util/{site}/{name}"] = util[i]
    return out
