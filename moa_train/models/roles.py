"""Parameter roles, declared by the modules that hold the parameters rather than inferred from
attribute names.

A module lists its roles in `PARAM_ROLES`: {attribute path (a submodule, whose parameters all take
the role, or a parameter): role}. `param_roles(model)` collects them for the optimizer's groups, the
scaled init and the fast-path checks.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn

# a router's parameters: their own lr multiplier and weight decay (optim.router_*)
ROUTER = "router"
# a projection into the residual stream: GPT-2 init std 0.02 / sqrt(2 n_layer)
RESIDUAL = "residual"
# norms and biases: no weight decay (nanoGPT's rule; a module declares its own)
NO_DECAY = "no_decay"
EMBEDDING = "embedding"  # token and position embeddings


def _declared(module: nn.Module, path: str) -> list:
    """The parameters at `path` under `module`: a submodule's, a parameter, or none (an optional
    part left out, such as the static MoAS's router)."""
    try:
        return list(module.get_submodule(path).parameters())
    except AttributeError:
        pass
    try:
        return [module.get_parameter(path)]
    except AttributeError:
        return []


def param_roles(model: nn.Module) -> dict:
    """{parameter name, as model.named_parameters() gives it: set of roles} for every parameter."""
    by_id: dict = {}
    for module in model.modules():
        for path, role in getattr(module, "PARAM_ROLES", {}).items():
            for p in _declared(module, path):
                by_id.setdefault(id(p), set()).add(role)
    return {name: by_id.get(id(p), set()) for name, p in model.named_parameters()}


def params_with(model: nn.Module, role: str) -> list:
    """The parameters declared with `role`, in model.parameters() order."""
    roles = param_roles(model)
    return [p for name, p in model.named_parameters() if role in roles[name]]


def declared_modules(module: nn.Module, role: str) -> list:
    """The submodules `module` itself declares with `role` (parameters declared alone, and optional
    parts left out, are not among them): its routers, for role ROUTER."""
    out = []
    for path, declared in getattr(module, "PARAM_ROLES", {}).items():
        if declared != role:
            continue
        with contextlib.suppress(AttributeError):
            out.append(module.get_submodule(path))
    return out
