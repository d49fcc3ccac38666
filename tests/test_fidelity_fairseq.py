"""The fairseq-faithful translation model and loss (experiment/_fairseq.yaml, docs/fidelity.md),
each behaviour pinned by what it does: init statistics per module, position rows at known positions,
the label-smoothing mass, ReLU and the activation dropout, attention dropout apart from residual
dropout, the aux terms' scaling with the batch's target tokens, the z-loss over padding and the cv
of the top-k gates."""

import math
import types

import pytest
import torch
from omegaconf import OmegaConf

import moa_train.config as config
from moa_train.config import AuxConfig, ConfigError
from moa_train.models.routing import Routing, aux_losses, cv_squared, z_loss
from moa_train.models.seq2seq import Seq2Seq
from moa_train.train.tasks import TranslationTask, smoothed_nll
from moa_train.train.tasks import validate as validate_task

V, PAD = 40, 0


def seq2seq(name: str = "mha", **keys) -> Seq2Seq:
    base = {
        "name": name,
        "d_model": 32,
        "n_layer": 1,
        "n_encoder_layer": 1,
        "n_head": 4,
        "max_seq_len": 32,
        "dropout": 0.0,
    }
    m = OmegaConf.structured(config.VARIANTS[name](**{**base, **keys}))
    torch.manual_seed(0)
    return Seq2Seq(m, V, PAD)


def uniform_std(bound: float) -> float:
    return bound / math.sqrt(3)


def xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


# --- init -----------------------------------------------------------------------------------------


def test_fairseq_init_of_the_moa_layer_is_per_expert():
    """At the paper's sizes (d 512, 8 experts of 128), each expert's Q and O have Xavier's std over
    its own matrix, sqrt(2 / (512 + 128)) = 0.056, not the 0.036 of Xavier over all experts' rows;
    K/V carry the 1/sqrt(2) gain."""
    d, e, dh = 512, 8, 128
    model = seq2seq(
        "moa",
        d_model=d,
        n_head=8,
        n_experts=e,
        top_k=e,
        head_dim=dh,
        bias=True,
        proj_bias=False,
        init="fairseq",
    )
    attn = model.encoder[0].self_attn
    assert attn.q_proj.bias is None and attn.kv_proj.bias is None and attn.c_proj.bias is None
    want = xavier_std(d, dh)
    assert want == pytest.approx(0.0559, abs=1e-4)
    for i in range(e):
        q = attn.q_proj.weight[i * dh : (i + 1) * dh]
        o = attn.c_proj.weight[:, i * dh : (i + 1) * dh]
        for w in (q, o):
            assert w.std().item() == pytest.approx(want, rel=0.03)
            # uniform within Xavier's bound
            assert w.abs().max().item() <= math.sqrt(3) * want + 1e-6
    for w in attn.kv_proj.weight.split(dh):
        assert w.std().item() == pytest.approx(xavier_std(d, dh, 2**-0.5), rel=0.03)
    assert not attn.router.weight.any()  # starts uniform, as the released code
    standard = (
        seq2seq("moa", d_model=d, n_head=8, n_experts=e, top_k=e, head_dim=dh).encoder[0].self_attn
    )
    # 0.036
    assert standard.q_proj.weight.std().item() == pytest.approx(xavier_std(d, e * dh), rel=0.03)


def test_fairseq_init_of_attention_and_ffn():
    """fairseq's MultiheadAttention: Q, K, V Xavier with gain 1/sqrt(2), their biases
    U(+-1/sqrt(d)); out Xavier, zero bias. The FFN: PyTorch's Linear default, U(+-1/sqrt(fan_in))
    for weights and biases. LayerNorms 1 and 0."""
    d = 256
    model = seq2seq("mha", d_model=d, n_head=4, bias=True, init="fairseq")
    attn, mlp = model.decoder[0].cross_attn, model.decoder[0].mlp
    for block in attn.c_attn.weight.split(d):
        assert block.std().item() == pytest.approx(xavier_std(d, d, 2**-0.5), rel=0.03)
    assert attn.c_attn.bias.abs().max().item() <= d**-0.5 and attn.c_attn.bias.std().item() > 0
    assert attn.c_proj.weight.std().item() == pytest.approx(xavier_std(d, d), rel=0.03)
    assert not attn.c_proj.bias.any()
    for layer in (mlp.c_fc, mlp.c_proj):
        bound = layer.in_features**-0.5
        assert layer.weight.std().item() == pytest.approx(uniform_std(bound), rel=0.03)
        assert layer.bias.abs().max().item() <= bound and layer.bias.std().item() > 0
    ln = model.decoder[0].sub_mlp.norm
    assert bool((ln.weight == 1).all()) and not ln.bias.any()
    assert model.embed.weight.std().item() == pytest.approx(d**-0.5, rel=0.05)
    assert not model.embed.weight[PAD].any()


def test_fairseq_init_is_refused_for_a_variant_fairseq_never_had(compose_cfg):
    cfg = compose_cfg(
        "experiment=multi30k_fairseq/mha", "model=moas_dynamic", "model.cross.name=mha"
    )
    with pytest.raises(
        ConfigError,
        match=r"^model.init: fairseq has no init for model.name=moas_dynamic; valid with",
    ):
        validate_task(cfg)
    with pytest.raises(ConfigError, match=r"^model.init: fairseq initialises the encoder-decoder"):
        validate_task(compose_cfg("model.init=fairseq"))


# --- positions ------------------------------------------------------------------------------------


def test_fairseq_positions_at_known_positions():
    """fairseq's table: [sin | cos] concatenated, frequency i is 10000^(-i / (half - 1)), and the
    first token sits at fairseq's position 2. d 8: half 4, frequencies 1, 10000^(-1/3),
    10000^(-2/3), 1e-4."""
    model = seq2seq("mha", d_model=8, n_head=2, positions="sinusoidal_fairseq")
    table = model.pos_table
    assert table[0, 0].item() == pytest.approx(0.9092974, abs=1e-6)  # sin(2)
    assert table[0, 4].item() == pytest.approx(-0.4161468, abs=1e-6)  # cos(2)
    assert table[0, 1].item() == pytest.approx(0.0926986, abs=1e-6)  # sin(2 * 0.0464159)
    assert table[3, 3].item() == pytest.approx(5e-4, rel=1e-4)  # sin(5 * 1e-4)
    assert table[3, 7].item() == pytest.approx(1.0, abs=1e-6)  # cos(5 * 1e-4)
    ids = torch.tensor([[5, 6, 7]])
    added = model._embed(model.embed, ids) - model.embed(ids) * model.embed_scale
    assert torch.allclose(added[0], table[:3], atol=1e-6)
    interleaved = seq2seq("mha", d_model=8, n_head=2, positions="sinusoidal").pos_table
    # sin(0), cos(0): the other layout
    assert interleaved[0, 0].item() == 0.0 and interleaved[0, 1].item() == 1.0


# --- label smoothing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over,target_mass,other_mass",
    [("all", 1 - 0.1 + 0.1 / V, 0.1 / V), ("others", 1 - 0.1, 0.1 / (V - 1))],
)
def test_label_smoothing_mass(over, target_mass, other_mass):
    """The distribution the loss pulls towards is softmax - gradient: fairseq's puts 1 - eps on the
    target and eps / (V - 1) on every other class; PyTorch's 1 - eps + eps/V and eps/V. Padding
    targets add nothing."""
    logits = torch.randn(3, V, requires_grad=True)
    target = torch.tensor([4, 9, PAD])
    smoothed_nll(logits, target, PAD, 0.1, over).backward()
    q = logits.softmax(-1).detach() - logits.grad
    for row, t in enumerate(target[:2].tolist()):
        assert q[row, t].item() == pytest.approx(target_mass, abs=1e-6)
        others = torch.cat([q[row, :t], q[row, t + 1 :]])
        assert torch.allclose(others, torch.full_like(others, other_mass), atol=1e-6)
    assert not logits.grad[2].any()


# --- FFN and dropout ------------------------------------------------------------------------------


def test_relu_ffn_with_activation_dropout():
    """ReLU zeroes the negative pre-activations; activation dropout p zeroes a share p of the others
    (train mode)."""
    model = seq2seq("mha", d_model=64, n_head=4, activation="relu", activation_dropout=0.5).train()
    mlp, seen = model.encoder[0].mlp, {}
    mlp.c_proj.register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))
    x = torch.randn(4, 50, 64)
    pre = mlp.c_fc(x)
    torch.manual_seed(1)
    mlp(x)
    h, positive = seen["h"], pre > 0
    assert not h[~positive].any()
    share = (h[positive] == 0).float().mean().item()
    n = int(positive.sum())
    assert abs(share - 0.5) < 5 * math.sqrt(0.25 / n)  # five binomial standard deviations
    mlp.eval()
    assert torch.equal(mlp.act(pre), torch.relu(pre))


def test_attention_dropout_apart_from_residual_dropout():
    """model.attn_dropout acts on the attention probabilities only: with residual dropout 0 no
    output element is zeroed, yet two training passes differ; attn_dropout 0 with residual dropout 0
    is deterministic."""
    x = torch.randn(2, 10, 32)
    attn = seq2seq("mha", attn_dropout=0.5).encoder[0].self_attn.train()
    a, b = attn(x)[0], attn(x)[0]
    assert not torch.equal(a, b) and (a == 0).float().mean().item() < 0.01
    quiet = seq2seq("mha", attn_dropout=0.0).encoder[0].self_attn.train()
    assert torch.equal(quiet(x)[0], quiet(x)[0])
    moa = seq2seq("moa", n_experts=4, top_k=2, dropout=0.3, attn_dropout=0.0).encoder[0].self_attn
    assert moa.dropout == 0.0 and moa.resid_dropout.p == 0.3


# --- aux terms ------------------------------------------------------------------------------------


def translation_loss(model, batch, aux: AuxConfig):
    """TranslationTask.loss on a bare task object (no data folder needed)."""
    task = TranslationTask.__new__(TranslationTask)
    task.data = types.SimpleNamespace(pad_id=PAD)
    task.dist = types.SimpleNamespace(world=1)
    task.label_smoothing, task.aux_cfg = 0.0, aux
    task.cfg = OmegaConf.create({"task": {"label_smoothing_over": "all"}})
    return task.loss(model, batch, True)


@pytest.mark.parametrize("divide", [False, True])
def test_aux_gradient_scales_with_the_batch_target_tokens(divide):
    """The MoA code adds the aux terms to the token-summed NLL and fairseq divides by the target
    tokens: the same batch twice over (twice the tokens, the same aux terms, which are token means)
    halves the aux term's gradient. Without divide_by_tokens it is the same for both batches."""
    model = seq2seq("moa", n_experts=4, top_k=2)
    for layer in [*model.encoder, *model.decoder]:
        torch.nn.init.normal_(layer.self_attn.router.weight, std=0.5)
    aux = AuxConfig(
        balance_type="switch",
        balance_coef=0.01,
        z_coef=0.001,
        layer_reduce="sum",
        divide_by_tokens=divide,
    )
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(1, V, (2, 6), generator=g), torch.randint(1, V, (2, 6), generator=g)
    grads, terms = [], []
    for reps in (1, 2):
        batch = {
            "src": src.repeat(reps, 1),
            "tgt_in": tgt.repeat(reps, 1),
            "tgt_out": tgt.repeat(reps, 1),
        }
        total, ce, aux_terms, _ = translation_loss(model, batch, aux)
        model.zero_grad()
        (total - ce).backward()
        grads.append(model.encoder[0].self_attn.router.weight.grad.clone())
        terms.append({k: v.item() for k, v in aux_terms.items()})
    # token means: the same for the repeated batch
    assert terms[0] == pytest.approx(terms[1], rel=1e-5)
    assert grads[0].abs().sum() > 0
    ratio = 2.0 if divide else 1.0
    assert torch.allclose(grads[0], ratio * grads[1], rtol=1e-4, atol=1e-9)
    if divide:  # and the scale is 1 / (target tokens): 12 here
        total, ce, aux_terms, _ = translation_loss(
            model, {"src": src, "tgt_in": tgt, "tgt_out": tgt}, aux
        )
        want = (0.01 * aux_terms["balance"] + 0.001 * aux_terms["z"]) / tgt.numel()
        assert (total - ce).item() == pytest.approx(want.item(), rel=1e-5)


def test_z_loss_over_every_token_and_cv_of_the_topk_gates():
    """z_tokens=all averages the z-loss over padding too (the MoA code does not mask it);
    cv_of=gates takes the cv of the top-k gate matrix (zeros where not chosen), not of the dense
    probabilities."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4], [5.0, 5.0, 5.0, 5.0]])
    probs = logits.softmax(-1)
    chosen = probs.topk(2, -1).indices
    mask = torch.tensor([True, True, False])  # the third token is padding
    r = Routing(probs, tuple("abcd"), chosen, logits, mask)
    real = aux_losses([r], AuxConfig(balance_type="switch"))
    every = aux_losses([r], AuxConfig(balance_type="switch", z_tokens="all", cv_of="gates"))
    assert real["z"].item() == pytest.approx(z_loss(logits[:2]).item(), rel=1e-6)
    assert every["z"].item() == pytest.approx(z_loss(logits).item(), rel=1e-6)
    assert every["z"].item() > real["z"].item()
    gates = torch.zeros_like(probs).scatter(-1, chosen, probs.gather(-1, chosen))
    assert every["cv"].item() == pytest.approx(cv_squared(gates[:2]).item(), rel=1e-6)
    assert real["cv"].item() == pytest.approx(cv_squared(probs[:2]).item(), rel=1e-6)
    assert every["cv"].item() != pytest.approx(real["cv"].item(), rel=1e-3)
    assert every["balance"].item() == pytest.approx(real["balance"].item())  # unchanged


# --- the experiments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "experiment",
    [
        "multi30k_fairseq/mha",
        "multi30k_fairseq/moa",
        "multi30k_fairseq/moa_sparse",
        "moa_wmt/mha_base",
        "moa_wmt/moa_8k8e128d",
    ],
)
def test_faithful_experiments_select_every_faithful_behaviour(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    m, t = cfg.model, cfg.trainer
    assert (m.norm_first, m.bias, m.activation, m.positions, m.init) == (
        False,
        True,
        "relu",
        "sinusoidal_fairseq",
        "fairseq",
    )
    assert (m.aux.z_tokens, m.aux.cv_of, m.aux.divide_by_tokens) == ("all", "gates", True)
    assert (
        cfg.task.label_smoothing,
        cfg.task.label_smoothing_over,
        t.grad_clip,
        cfg.optim.eps,
    ) == (
        0.1,
        "others",
        None,
        1e-9,
    )
    if m.name == "moa":
        assert (
            m.proj_bias is False and m.aux.balance_type == "switch" and m.aux.layer_reduce == "sum"
        )
        assert (m.dropout, m.attn_dropout, m.activation_dropout) == (0.2, 0.2, 0.2)
    validate_task(cfg)
