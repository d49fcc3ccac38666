"""The fairseq-faithful translation model and loss (experiment/_fairseq.yaml, docs/fidelity.md),
each behaviour pinned by what it does: init statistics per module, position rows at known positions,
the label-smoothing mass, ReLU and the activation dropout, attention dropout apart from residual
dropout, the aux terms' scaling with the batch's target tokens, the z-loss over padding and the cv
of the top-k gates."""

import math
import types

import numpy as np
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
    assert (m.pad_positions, t.grad_accum_norm) == ("zeroed", "tokens")
    e = cfg.task
    assert (e.batch_format, e.max_len_a, e.max_len_b, e.min_len, e.force_eos) == (
        "fairseq",
        0.0,
        200,
        1,
        True,
    )
    if m.name == "moa":
        assert (
            m.proj_bias is False and m.aux.balance_type == "switch" and m.aux.layer_reduce == "sum"
        )
        assert (m.dropout, m.attn_dropout, m.activation_dropout) == (0.2, 0.2, 0.2)
    if "mha_base" not in experiment:  # run.sh's --activation-dropout, the decoder's FFN
        assert m.decoder_activation_dropout == 0.1
    validate_task(cfg)


# --- issue 32: decoder activation dropout, padding, accumulation, batches, decoding -------------


def zero_share_after_activation(mlp, x: torch.Tensor) -> float:
    """Share of the positive ReLU outputs that the activation dropout zeroes (train mode)."""
    seen = {}
    handle = mlp.c_proj.register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))
    positive = mlp.c_fc(x) > 0
    mlp(x)
    handle.remove()
    return (seen["h"][positive] == 0).float().mean().item()


def test_decoder_ffn_takes_its_own_activation_dropout(compose_cfg):
    """The released decoder layer drops out with --activation-dropout (0.1) after the ReLU, its
    encoder layer with --dropout (0.2): the zero shares after the activation are 0.1 and 0.2 (about
    100k positive units each: a binomial standard deviation of 0.001)."""
    model = seq2seq(
        "mha",
        d_model=64,
        activation="relu",
        activation_dropout=0.2,
        decoder_activation_dropout=0.1,
    ).train()
    x = torch.randn(8, 100, 64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    assert zero_share_after_activation(model.decoder[0].mlp, x) == pytest.approx(0.1, abs=0.006)
    assert zero_share_after_activation(model.encoder[0].mlp, x) == pytest.approx(0.2, abs=0.006)
    # null: the encoder's value in both stacks
    same = seq2seq("mha", d_model=64, activation="relu", activation_dropout=0.2).train()
    assert zero_share_after_activation(same.decoder[0].mlp, x) == pytest.approx(0.2, abs=0.006)


def padded_moa(pad_positions: str) -> Seq2Seq:
    """Post-LN MoA with biases (fairseq's layout), two layers a side, routers away from zero."""
    model = seq2seq(
        "moa",
        n_experts=4,
        top_k=2,
        n_layer=2,
        n_encoder_layer=2,
        norm_first=False,
        bias=True,
        proj_bias=False,
        activation="relu",
        pad_positions=pad_positions,
    )
    torch.manual_seed(4)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):  # LayerNorms away from (1, 0)
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
            torch.nn.init.normal_(module.bias, 0.0, 0.3)
        if hasattr(module, "router"):
            torch.nn.init.normal_(module.router.weight, std=0.5)
    return model.eval()


def test_pads_route_as_the_reference_on_a_padded_batch():
    """fairseq zeroes a pad position's input and the MoA layer routes no expert for a pad query (its
    attention output is zero), so a pad's router logits do not depend on the sentence: zero in the
    first layer (logsumexp = log E), in the second the router of LN2(b1 + FFN(b1)) with b1 = LN1's
    bias (post-LN of a zero sum). The z-loss over every token (z_tokens=all) then holds the real
    tokens' terms unchanged plus those. With pads kept, their logits follow the sentence."""
    src = torch.tensor([[5, 6, 7, 8, 9], [11, 12, PAD, PAD, PAD]])
    tgt = torch.tensor([[5, 6, 7, 8], [13, 14, 15, PAD]])
    aux = AuxConfig(balance_type="switch", z_coef=0.001, layer_reduce="sum", z_tokens="all")
    zeroed, kept = padded_moa("zeroed"), padded_moa("kept")
    _, r_zeroed = zeroed(src, tgt)
    _, r_kept = kept(src, tgt)
    pads = ~r_zeroed[0].mask
    layer0, layer1 = zeroed.encoder[0], zeroed.encoder[1]
    # layer 0: zero input, zero logits
    assert not r_zeroed[0].logits[pads].any()
    b1 = layer0.sub_attn.norm.bias
    h = layer0.sub_mlp.norm(b1 + layer0.mlp(b1))
    want = layer1.self_attn.router(h)
    assert torch.allclose(r_zeroed[1].logits[pads], want.expand(int(pads.sum()), -1), atol=1e-5)
    # the decoder's pads too: zero at its first self-attention, then its cross-attention's router
    # of that sublayer's LN bias
    dec_pads, dec0 = ~r_zeroed[2].mask, zeroed.decoder[0]
    assert not r_zeroed[2].logits[dec_pads].any()
    want = dec0.cross_attn.router(dec0.sub_self.norm.bias)
    assert torch.allclose(r_zeroed[3].logits[dec_pads], want[None], atol=1e-5)
    # real tokens: the same logits either way
    for a, b in zip(r_zeroed, r_kept, strict=True):
        assert torch.allclose(a.logits[a.mask], b.logits[b.mask], atol=1e-5)
    assert not torch.allclose(r_kept[1].logits[pads], want.expand(int(pads.sum()), -1), atol=1e-3)
    # the z term: over every token, pads with the reference's logits
    z = aux_losses(r_zeroed, aux)["z"]
    enc = [torch.logsumexp(r.logits, -1).pow(2).mean() for r in r_zeroed]
    assert z.item() == pytest.approx(sum(enc).item(), rel=1e-6)
    assert enc[0].item() == pytest.approx(
        (torch.logsumexp(r_kept[0].logits[~pads], -1).pow(2).sum() + 3 * math.log(4) ** 2).item()
        / 10,
        rel=1e-5,
    )


def accumulated_grads(model, batches: list, norm: str, aux: AuxConfig) -> torch.Tensor:
    """The flat gradient of one optimizer step over `batches` (the trainer's step_body on a stub
    trainer, no update) with trainer.grad_accum_norm=`norm`."""
    from moa_train.train.loop import Trainer

    model.zero_grad()
    stub = types.SimpleNamespace(
        cfg=OmegaConf.create({"trainer": {"grad_accum_norm": norm, "grad_clip": None}}),
        task=types.SimpleNamespace(n_tokens=lambda b: b["n_tokens"]),
        train_model=model,
        model=model,
        phases=None,
        forward_loss=lambda b, log: translation_loss(model, b, aux),
        grad_norm=lambda params: torch.tensor(0.0),
        guard=types.SimpleNamespace(step=lambda *args: torch.tensor(False)),
    )
    Trainer.step_body(stub, batches, False)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_grad_accum_norm_tokens_gives_one_big_batch_gradient():
    """fairseq sums the update's losses and divides by its target tokens: two micro-batches of 3
    and 12 target tokens give the gradient of one batch holding both (grad_accum_norm=tokens);
    the default mean of the two per-token means does not."""
    model = seq2seq("mha", dropout=0.0)
    g = torch.Generator().manual_seed(5)

    def batch(rows, length):
        tgt = torch.randint(3, V, (rows, length), generator=g)
        return {
            "src": torch.randint(3, V, (rows, 5), generator=g),
            "tgt_in": tgt,
            "tgt_out": tgt,
            "n_tokens": rows * length,
        }

    small, large = batch(1, 3), batch(3, 4)
    aux = AuxConfig()

    # one batch: the small one padded to the large one's length
    pad = torch.full((1, 1), PAD)
    both = {
        "src": torch.cat([small["src"], large["src"]]),
        "tgt_in": torch.cat([torch.cat([small["tgt_in"], pad], 1), large["tgt_in"]]),
        "tgt_out": torch.cat([torch.cat([small["tgt_out"], pad], 1), large["tgt_out"]]),
        "n_tokens": 15,
    }
    whole = accumulated_grads(model, [both], "mean", aux)
    tokens = accumulated_grads(model, [small, large], "tokens", aux)
    mean = accumulated_grads(model, [small, large], "mean", aux)
    assert torch.allclose(tokens, whole, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(mean, whole, rtol=1e-2, atol=1e-5)


def test_fairseq_batches_end_sources_in_eos_and_start_the_decoder_with_eos():
    from moa_train.data.translation import ParallelSplit, TokenBatches

    src = [np.array([5, 6, 7]), np.array([8])]
    tgt = [np.array([9, 10]), np.array([11, 12, 13])]
    split = ParallelSplit(src, tgt, ["a", "b"], ["c", "d"])
    bos, eos = 1, 2
    for fmt, start, src_rows in (
        ("plain", bos, [[5, 6, 7], [8, PAD, PAD]]),
        ("fairseq", eos, [[5, 6, 7, eos], [8, eos, PAD, PAD]]),
    ):
        batches = TokenBatches(split, 1000, PAD, bos, eos, shuffle=False, batch_format=fmt)
        b = next(iter(batches))
        order = b["index"].tolist()
        rows = dict(zip(order, b["src"].tolist(), strict=True))
        assert [rows[0], rows[1]] == src_rows
        t_in = dict(zip(order, b["tgt_in"].tolist(), strict=True))
        t_out = dict(zip(order, b["tgt_out"].tolist(), strict=True))
        assert t_in[0] == [start, 9, 10, PAD] and t_out[0] == [9, 10, eos, PAD]
        assert t_in[1] == [start, 11, 12, 13] and t_out[1] == [11, 12, 13, eos]
        assert b["n_tokens"] == 7


class TableModel:
    """A decoder whose next-token log-probabilities depend only on the prefix's last token, from a
    table; vocabulary PAD 0, BOS 1, EOS 2, a 3, b 4."""

    def __init__(self, table: dict):
        self.table = table

    def encode(self, src, src_mask):
        return torch.zeros(src.shape[0], src.shape[1], 1)

    def decode(self, tokens, memory, src_mask, last_only=True):
        rows = [self.table[t] for t in tokens[:, -1].tolist()]
        return torch.tensor(rows).log()[:, None]


def test_decoding_limits_min_len_and_forced_eos():
    """fairseq-generate: EOS refused before min_len tokens, and at the limit only EOS, its
    probability counted in the score. After BOS the model puts 0.6 on EOS: min_len 0 gives the empty
    hypothesis, min_len 1 one token. With max_len 1 and beam 2, 'a' (0.3) beats 'b' (0.1) when cut
    beams are scored as they stand, but 'a' then ends with EOS at 0.01 and 'b' at 0.9: with the
    forced EOS 'b' wins (0.09 > 0.003)."""
    from moa_train.models.search import beam_search, greedy_search

    bos, eos, a, b = 1, 2, 3, 4
    table = {
        bos: [1e-9, 1e-9, 0.6, 0.3, 0.1],
        a: [1e-9, 1e-9, 0.01, 0.98, 0.01],
        b: [1e-9, 1e-9, 0.9, 0.05, 0.05],
    }
    model, src = TableModel(table), torch.tensor([[5, 6]])
    mask = src != PAD
    args = (model, src, mask, bos, eos, PAD)
    assert greedy_search(*args, 5, use_cache=False) == [[]]
    assert greedy_search(*args, 5, use_cache=False, min_len=1) == [[a, a, a, a, a]]
    assert greedy_search(*args, 3, use_cache=False, min_len=1, force_eos=True) == [[a, a, a]]
    search = {"beam": 2, "lenpen": 1.0, "use_cache": False, "min_len": 1}
    assert beam_search(*args, 1, **search) == [[a]]
    assert beam_search(*args, 1, force_eos=True, **search) == [[b]]
    # the decoder's first input: BOS by default, EOS in fairseq's batches (start_id)
    table[eos] = table[bos]
    seen = []
    model.decode = lambda tokens, *rest, **kw: (
        seen.append(tokens[0, 0].item()) or (torch.tensor([table[eos]]).log()[:, None])
    )
    greedy_search(*args, 2, use_cache=False, start_id=eos)
    assert seen and set(seen) == {eos}


def test_the_faithful_task_decodes_with_fairseq_generates_limits(compose_cfg):
    """The faithful experiments decode up to 200 tokens whatever the source (max_len_a 0, b 200),
    at least 1, EOS forced at the limit, from fairseq's batches."""
    cfg = compose_cfg("experiment=multi30k_fairseq/moa")
    e = cfg.task
    assert (e.max_len_a, e.max_len_b, e.min_len, e.force_eos, e.batch_format) == (
        0.0,
        200,
        1,
        True,
        "fairseq",
    )
    plain = compose_cfg("experiment=multi30k/mha").task
    assert (plain.max_len_a, plain.max_len_b, plain.min_len, plain.force_eos) == (1.2, 10, 0, False)
    assert plain.batch_format == "plain"
