"""Every config on disk composes, validates and builds; the MoAS Table 1 sizes match the paper's
counts."""

from __future__ import annotations

import itertools
from dataclasses import fields

import pytest
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from conftest import CONFIG_DIR
from moa_train.config import VARIANTS, ConfigError, preset_variant, presets
from moa_train.models import build_model
from moa_train.models.registry import ATTENTION
from moa_train.models.seq2seq import Seq2Seq
from moa_train.train.tasks import validate

VOCAB = 283  # WikiText-2 characters


def group_options(group: str) -> list:
    """The options of a config group as found on disk (sub-folders included, `_` files left out)."""
    root = CONFIG_DIR / group
    names = (p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
    return sorted(n for n in names if not any(part.startswith("_") for part in n.split("/")))


MODELS = presets()
EXPERIMENTS = group_options("experiment")
DATA = group_options("data")
TRANSLATION_DATA = [
    d for d in DATA if "translation" in OmegaConf.load(CONFIG_DIR / "data" / f"{d}.yaml").tasks
]


def test_groups_found_on_disk():
    assert (
        set(ATTENTION) | {"moa_sparse", "moa_dense"} <= set(MODELS) == set(group_options("model"))
    )
    assert {
        "quickstart",
        "moas_table1/mha",
        "moas_table1/moas_static",
        "moas_table1/moas_dynamic",
    } <= set(EXPERIMENTS)
    assert {"wikitext2_char", "wikitext2_word", "wikitext2_bpe"} <= set(DATA)


def check_builds(cfg) -> None:
    """Validate, resolve and build the task's model at full size on the meta device (shapes
    only)."""
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    with torch.device("meta"):  # experiment sizes: shapes and counts only, no memory or init cost
        if cfg.task.name == "translation":
            model = Seq2Seq(cfg.model, VOCAB, 0)
            assert len(model.decoder) == cfg.model.n_layer
            assert model.num_params() > 0 and model.flops_per_token(32) > 0
            return
        lm = build_model(cfg.model, VOCAB)
    assert len(lm.blocks) == cfg.model.n_layer
    if cfg.model.positions == "rope":  # rotary positions inside attention: no table
        assert lm.wpe is None
    else:
        assert lm.wpe.weight.shape == (cfg.model.max_seq_len, cfg.model.d_model)
    assert lm.num_params() > 0 and lm.flops_per_token(cfg.trainer.block_size) > 0


@pytest.mark.parametrize("model,data", list(itertools.product(MODELS, DATA)))
def test_every_model_with_every_data_composes_and_builds(compose_cfg, model, data):
    # quickstart's 128 positions hold translation pairs of up to 127 tokens
    extra = ["task.max_len=127"] if data in TRANSLATION_DATA else []
    cfg = compose_cfg(f"model={model}", f"data={data}", *extra)
    assert cfg.model.name == preset_variant(model) and cfg.data.name == data
    check_builds(cfg)


def experiment_model_keys(experiment: str) -> set:
    """The model keys an experiment file (and the experiments it includes) sets."""
    node = OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml")
    keys = set(node.get("model", {}))
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and entry.startswith("/experiment/"):
            keys |= experiment_model_keys(entry.removeprefix("/experiment/"))
    return keys


@pytest.mark.parametrize("model,experiment", list(itertools.product(MODELS, EXPERIMENTS)))
def test_every_experiment_with_every_model_composes_and_builds(compose_cfg, model, experiment):
    """Each experiment with its own data, and any model chosen on the command line (it wins over the
    experiment); an experiment that sets keys of another variant (moa_wmt/moa_8k8e128d:
    model.n_experts) is refused naming one."""
    foreign = experiment_model_keys(experiment) - {
        f.name for f in fields(VARIANTS[preset_variant(model)])
    }
    if foreign:
        with pytest.raises(HydraException, match="|".join(f"model.{key}" for key in foreign)):
            compose_cfg(f"experiment={experiment}", f"model={model}")
        return
    cfg = compose_cfg(f"experiment={experiment}", f"model={model}")
    assert cfg.model.name == preset_variant(model)
    if VARIANTS[cfg.model.name].rope_required and cfg.model.positions != "rope":
        # a variant defined with rotary positions (mla) refuses an experiment's table in one line
        with pytest.raises(ConfigError, match=r"^model.positions: .* needs rope"):
            validate(cfg)
        cfg.model.positions = "rope"
    if VARIANTS[cfg.model.name].rope_required and cfg.model.rope_fraction != 1.0:
        # an experiment that rotates part of each head (successors/switchhead_wt2: half, as
        # SwitchHeadRope) is refused by mla, which rotates its own rotary channels only
        with pytest.raises(ConfigError, match=r"^model.rope_fraction: model=mla rotates"):
            validate(cfg)
        cfg.model.rope_fraction = 1.0
    if cfg.model.init == "fairseq" and not hasattr(ATTENTION[cfg.model.name], "init_fairseq"):
        # the fairseq-faithful experiments initialise each module as fairseq does: a scheme fairseq
        # never had is refused in one line (model.init=standard runs it)
        with pytest.raises(
            ConfigError, match=f"^model.init: fairseq has no init for model.name={cfg.model.name}"
        ):
            validate(cfg)
        cfg.model.init = "standard"
    check_builds(cfg)


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.n_head=5", "model.n_head"),
        ("model.dropout=1.0", "model.dropout"),
        ("trainer.block_size=999", "trainer.block_size"),
        ("trainer.grad_accum=3", "trainer.grad_accum"),
        ("optim.lr=0", "optim.lr"),
        ("schedule=cosine schedule.warmup_steps=-1", "schedule.warmup_steps"),
        ("data=wikitext2_bpe data.vocab_size=100", "data.vocab_size"),
        ("data.root=/nonexistent/folder", "data.root"),
        ("trainer.eval_only=true trainer.resume=false", "trainer.eval_only"),
    ],
)
def test_validate_names_the_bad_key(make_cfg, override, key):
    cfg = make_cfg(*override.split())
    with pytest.raises(ConfigError, match=f"^{key}:"):
        validate(cfg)


# --- MoAS paper Table 1 ---------------------------------------------------------------------------

# Table 1's size, counted by hand: d 384, 4 layers, 6 heads of 64, the GQA branch with 2 K/V heads,
# no biases, MLP 4d, the char vocabulary, 256 positions; the router is d -> d/4 -> 3
D, L, H, G, HD, T = 384, 4, 6, 2, 64, 256
ATTN = {  # attention weights per layer: Q and O for each query set, K and V for each branch's heads
    "mha": 4 * D * D,
    "moas_static": 3 * D * D + 2 * D * (H + G + 1) * HD + 3 * D * D,
    "moas_dynamic": 3 * D * D + 2 * D * (H + G + 1) * HD + 3 * D * D + D * (D // 4) + (D // 4) * 3,
}
# query heads = sets x H: each attends over T keys
QUERY_SETS = {"mha": 1, "moas_static": 3, "moas_dynamic": 3}


def hand_params(name: str) -> tuple:
    """(non-embedding as nanoGPT counts it: all but the positions, total)."""
    per_layer = ATTN[name] + 8 * D * D + 2 * D  # + MLP + the two LayerNorm weights
    non_embedding = L * per_layer + D + VOCAB * D  # + final LayerNorm + the (tied) token embedding
    return non_embedding, non_embedding + T * D


def hand_flops(name: str) -> int:
    """6 x the matmul weights a token uses (tied head once) + 12 x layers x query heads x head size
    x T."""
    return 6 * (L * (ATTN[name] + 8 * D * D) + VOCAB * D) + 12 * L * QUERY_SETS[name] * H * HD * T


TABLE1 = sorted(ATTN)


@pytest.fixture(scope="module")
def table1_models(compose_cfg):
    return {
        name: build_model(compose_cfg(f"experiment=moas_table1/{name}").model, VOCAB)
        for name in TABLE1
    }


@pytest.mark.parametrize("name", TABLE1)
def test_table1_parameter_counts(table1_models, name):
    lm = table1_models[name]
    assert lm.config.name == name and lm.config.max_seq_len == T
    assert (lm.num_params(), lm.num_params(non_embedding=False)) == hand_params(name)


@pytest.mark.parametrize("name", TABLE1)
def test_table1_flops_against_a_hand_count(table1_models, name):
    assert table1_models[name].flops_per_token(T) == hand_flops(name)
    # the MoAS paper's models cost about 1.57x (static) and 1.59x (dynamic) an MHA's FLOPs per token
    # at this size
    assert 1.5 < hand_flops(name) / hand_flops("mha") < 1.6 or name == "mha"


def test_table1_experiment_settings(compose_cfg):
    cfg = compose_cfg("experiment=moas_table1/moas_dynamic")
    assert (cfg.data.tokenizer, cfg.data.split) == ("char", "moas_paper")
    assert (cfg.trainer.batch_size, cfg.trainer.block_size, cfg.trainer.max_steps) == (12, 256, 500)
    assert cfg.model.gate_dropout == pytest.approx(0.1) and cfg.model.aux.balance_type == "mse"
    # the released code's residual dropout, per branch before the mix (mha has one dropout anyway)
    assert compose_cfg("experiment=moas_table1/moas_static").model.resid_dropout == "per_branch"
    assert cfg.model.resid_dropout == "per_branch"
    assert compose_cfg("model=moas_dynamic").model.resid_dropout == "mixed"


@pytest.mark.parametrize("mode", ["faithful", "fast"])
@pytest.mark.parametrize("row", ["mha", "moas_static", "moas_dynamic"])
def test_table1_modes_compose(compose_cfg, mode, row):
    cfg = compose_cfg(f"experiment=moas_table1/{row}", f"mode={mode}")
    validate(cfg)
    assert (
        cfg.data.split == "moas_paper"
        and cfg.trainer.batch_size == 12
        and cfg.trainer.max_steps == 500
    )
    assert (
        cfg.trainer.eval_iters == 20
        and cfg.trainer.eval_batch_size == 12
        and cfg.trainer.grad_clip is None
    )
    if mode == "faithful":
        assert cfg.trainer.precision == "fp32" and not cfg.trainer.tf32 and not cfg.trainer.compile
    else:
        assert cfg.trainer.precision == "bf16" and cfg.trainer.tf32 and cfg.trainer.compile


# --- configs saved before variants owned their keys -----------------------------------------------


@pytest.mark.parametrize("run", ["mha", "moas_static", "moas_dynamic"])
def test_run_configs_saved_with_every_variant_s_keys_still_build(compose_cfg, run):
    """Old saved configs hold every variant's keys (mha with n_experts, ...): a model is built from
    the keys its variant owns, and trainer.eval_only types the run's model by the run's own variant,
    not the command line's. The configs are copies of the Table 1 runs'
    docs/results/runs/moas_table1/faithful/<row>-seed0/.hydra/config.yaml
    (tests/fixtures/old_configs/), so re-running those rows does not take the old format away."""
    from moa_train.config import variant_keys
    from moa_train.train.eval_run import eval_config
    from moa_train.train.tasks import saved_config

    old = OmegaConf.load(CONFIG_DIR.parent / "tests/fixtures/old_configs" / f"{run}.yaml")
    assert {"n_experts", "gqa_kv_heads", "n_kv_heads"} <= set(old.model)
    assert old.optim.fused is None  # "auto" then; the migration makes it true
    run_cfg = OmegaConf.to_container(old)
    saved = OmegaConf.create(saved_config(run_cfg))  # as load_run reads it
    assert saved.optim.fused is True
    with torch.device("meta"):
        lm = build_model(saved.model, VOCAB)
    assert lm.num_params() == hand_params(saved.model.name)[0]
    out = eval_config(compose_cfg("model=moa"), run_cfg)
    assert OmegaConf.get_type(out.model) is VARIANTS[saved.model.name]
    assert set(out.model) == variant_keys(VARIANTS[saved.model.name])


def test_task_follows_the_data_and_a_mismatch_is_refused(compose_cfg):
    """data=multi30k_en_de alone makes a translation run; task=lm with it is refused in one line."""
    assert compose_cfg("data=multi30k_en_de").task.name == "translation"
    assert compose_cfg("data=wikitext2_char").task.name == "lm"
    assert (
        compose_cfg("task=translation", "data=multi30k_en_de", "task.max_len=127").task.name
        == "translation"
    )
    with pytest.raises(
        ConfigError,
        match=r"^task: lm does not fit data=multi30k_en_de \(it feeds: translation\); "
        r"use task=translation or leave task out$",
    ):
        validate(compose_cfg("task=lm", "data=multi30k_en_de"))


def test_runs_saved_without_a_task_take_their_data_task():
    """Checkpoints and run records written before tasks were named: the task their data config ships
    with."""
    from moa_train.train.tasks import saved_task

    assert saved_task({"data": {"name": "multi30k_en_de"}}) == "translation"
    assert saved_task({"data": {"name": "wikitext2_char"}}) == "lm"
    assert saved_task({"data": {"name": "gone_corpus"}}) == "lm"
    assert (
        saved_task({"task": {"name": "translation"}, "data": {"name": "x", "task": "translation"}})
        == "translation"
    )
