"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import pytest
import torch
from omegaconf import OmegaConf

from moa_train.config import OptimConfig
from moa_train.models import build_model
from moa_train.models.roles import ROUTER
from moa_train.train.optim import build_optimizer, lr_factor, param_groups


def schedule(name: str, warmup: int = 0, min_lr_ratio: float = 0.1):
    return OmegaConf.create({"name": name, "warmup_steps": warmup, "min_lr_ratio": min_lr_ratio})


def test_constant_with_warmup():
    cfg = schedule("constant", warmup=4)
    assert [lr_factor(s, cfg, 100) for s in range(6)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    )


def test_cosine_decays_to_min_ratio():
    cfg = schedule("cosine", warmup=10, min_lr_ratio=0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    factors = [lr_factor(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


def test_inverse_sqrt():
    cfg = schedule("inverse_sqrt", warmup=16)
    assert lr_factor(15, cfg, 1000) == pytest.approx(1.0)
    assert lr_factor(63, cfg, 1000) == pytest.approx(math.sqrt(16 / 64))


@pytest.mark.parametrize("model", ["moas_dynamic", "moa"])
def test_router_parameters_have_their_own_group(make_cfg, model):
    cfg = make_cfg(
        f"model={model}",
        "model.bias=true",
        "optim.router_lr_mult=2.0",
        "optim.router_weight_decay=0.0",
    )
    lm = build_model(cfg.model, 50)
    groups = {g["name"]: g for g in param_groups(lm, cfg.optim)}
    router = {id(p): p for n, p in lm.named_parameters() if ".router." in f".{n}"}
    assert router and {id(p) for p in groups["router"]["params"]} == {
        i for i, p in router.items() if p.dim() >= 2
    }
    # the router's biases (MoAS's follow model.bias) keep the router's lr, without weight decay
    assert {id(p) for p in groups.get("router_no_decay", {"params": []})["params"]} == {
        i for i, p in router.items() if p.dim() < 2
    }
    assert groups["router"]["lr"] == pytest.approx(2.0 * cfg.optim.lr)
    assert groups["router"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in lm.named_parameters()}
    assert all(
        p.dim() >= 2 and not names[id(p)].endswith("bias") for p in groups["decay"]["params"]
    )
    # 1-D parameters and biases of any shape (MoAS's (3, d) o_bias)
    assert all(p.dim() < 2 or names[id(p)].endswith("bias") for p in groups["no_decay"]["params"])
    assert (
        groups["decay"]["weight_decay"] == cfg.optim.weight_decay
        and groups["no_decay"]["weight_decay"] == 0.0
    )
    # every parameter in exactly one group (the tied embedding once)
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(lm.parameters()))


def test_dense_model_has_no_router_group(make_cfg):
    cfg = make_cfg("model=mha")
    lm = build_model(cfg.model, 50)
    opt = build_optimizer(lm, cfg.optim, torch.device("cpu"))
    assert {g["name"] for g in opt.param_groups} == {"decay", "no_decay"}


def test_groups_follow_declared_roles_not_attribute_names():
    """A router under another name joins the router group through its module's PARAM_ROLES; one
    named `router` without the declaration does not; a bias is left undecayed where its module
    declares it NO_DECAY (proj's is not declared, so it decays)."""
    from moa_train.models.roles import NO_DECAY

    class Gated(torch.nn.Module):
        PARAM_ROLES: ClassVar[dict] = {
            "gate": ROUTER,
            "gate.bias": NO_DECAY,
            "router.bias": NO_DECAY,
        }

        def __init__(self):
            super().__init__()
            self.gate, self.router, self.proj = (torch.nn.Linear(4, 4) for _ in range(3))

    model = Gated()
    groups = {
        g["name"]: g["params"] for g in param_groups(model, OmegaConf.structured(OptimConfig))
    }
    assert {id(p) for p in groups["router"]} == {id(model.gate.weight)}
    assert {id(p) for p in groups["router_no_decay"]} == {id(model.gate.bias)}
    assert {id(p) for p in groups["no_decay"]} == {id(model.router.bias)}
    assert {id(p) for p in groups["decay"]} == {
        id(model.router.weight),
        id(model.proj.weight),
        id(model.proj.bias),
    }


@pytest.mark.parametrize("bias", [False, True])
def test_declared_no_decay_and_embedding_roles_cover_exactly_the_norms_biases_and_embeddings(
    compose_cfg, bias
):
    """Every preset, LM and encoder-decoder: the parameters declared NO_DECAY are exactly the 1-D
    ones and the biases (norms and biases: nanoGPT's groups, now declared by their modules), and
    EMBEDDING exactly the nn.Embedding weights."""
    import torch.nn as nn

    from moa_train.config import presets
    from moa_train.models import build_model
    from moa_train.models.roles import EMBEDDING, NO_DECAY, param_roles
    from moa_train.models.seq2seq import Seq2Seq

    models = [
        build_model(compose_cfg(f"model={name}", f"model.bias={bias}").model, 100)
        for name in presets()
    ]
    models.append(
        Seq2Seq(
            compose_cfg(
                "data=multi30k_en_de",
                "model=moa",
                f"model.bias={bias}",
                "model.share_embeddings=false",
            ).model,
            100,
            0,
        )
    )
    for model in models:
        roles = param_roles(model)
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        for name, p in model.named_parameters():
            # biases of any shape (MoAS's (3, d) o_bias too, as the reference decays no bias)
            assert (NO_DECAY in roles[name]) == (p.dim() < 2 or name.endswith("bias")), name
            assert (EMBEDDING in roles[name]) == (id(p) in embeddings), name
