"""task=mlm: an encoder-only bidirectional Transformer with BERT masking (moa_train/train/mlm.py,
moa_train/models/encoder.py)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from moa_train.config import compose_train as compose
from moa_train.paths import config_dir
from moa_train.train.mlm import IGNORE, MLMConfig, draw, mask_tokens
from moa_train.train.tasks import make_task, task_class

VARIANTS = ["mha", "moa", "moas_dynamic", "moas_static"]


def tiny_model(name: str):
    cfg = compose([f"model={name}", "debug=tiny", "task=mlm", "data=wikitext2_bpe"])
    model = task_class("mlm").build_model(cfg.model, 50)
    return model.eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_a_later_token_changes_an_earlier_position(name):
    """Bidirectional: unlike the LM, an earlier position's output depends on later tokens."""
    torch.manual_seed(0)
    model = tiny_model(name)
    x = torch.randint(50, (2, 12))
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1) % 50
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-6)


def test_padding_is_masked_out():
    """With a pad id, a pad token changes nothing at the real positions."""
    torch.manual_seed(0)
    cfg = compose(["model=mha", "debug=tiny", "task=mlm", "data=wikitext2_bpe"])
    model = task_class("mlm").build_model(cfg.model, 50, pad_id=0).eval()
    x = torch.randint(1, 50, (1, 10))
    x[:, 7:] = 0
    y = x.clone()
    y[:, 8] = 5  # a real token where there was padding
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert torch.allclose(a[:, :7], model(x[:, :7])[0], atol=1e-5)
    assert not torch.allclose(a[:, :7], b[:, :7], atol=1e-6)


def test_masking_statistics_over_many_batches():
    """15% of the non-special tokens selected, 80% of those [MASK], 10% random, 10% kept; special
    tokens never selected."""
    task, g = MLMConfig(), torch.Generator().manual_seed(0)
    vocab, mask_id, special = 100, 100, [0, 1]
    x = torch.randint(100, (64, 128), generator=torch.Generator().manual_seed(1))
    picked = masked = kept = n = 0
    for _ in range(40):
        inputs, targets = mask_tokens(x, draw(g, tuple(x.shape), vocab), task, mask_id, special)
        sel = targets != IGNORE
        assert not sel[torch.isin(x, torch.tensor(special))].any()
        assert torch.equal(inputs[~sel], x[~sel]) and torch.equal(targets[sel], x[sel])
        picked += int(sel.sum())
        masked += int((inputs[sel] == mask_id).sum())
        kept += int((inputs[sel] == x[sel]).sum())
        n += int((~torch.isin(x, torch.tensor(special))).sum())
    assert picked / n == pytest.approx(0.15, abs=0.003)
    assert masked / picked == pytest.approx(0.8, abs=0.01)
    # a random replacement equals the original 1 time in 100: kept = 10% + 10% / 100
    assert kept / picked == pytest.approx(0.1 + 0.1 / vocab, abs=0.01)
    assert 1 - masked / picked - kept / picked == pytest.approx(0.1 - 0.1 / vocab, abs=0.01)


@pytest.fixture(scope="module")
def mlm_task(data_root, cache_dir):
    cfg = compose(
        [
            f"data.root={data_root}",
            f"data.cache_dir={cache_dir}",
            "task=mlm",
            "data=wikitext2_word",
            "model=moa",
            "debug=tiny",
            "trainer.device=cpu",
        ]
    )
    return make_task(cfg, torch.device("cpu"))


def test_validation_masks_are_the_same_at_every_evaluation(mlm_task):
    """The val windows and masks come from task.eval_seed alone: two evaluations, and training
    draws between them, see the same batches; training batches differ from draw to draw."""
    first = list(mlm_task.eval_batches("val"))
    mlm_task.next_batch()
    again = list(mlm_task.eval_batches("val"))
    assert len(first) == len(again) > 0
    for (a, b), (c, d) in zip(first, again, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    one, two = mlm_task.next_batch(), mlm_task.next_batch()
    assert not torch.equal(one[1], two[1])
    ev = mlm_task.evaluate(mlm_task.model, "val", "val", contextlib.nullcontext)
    assert set(ev) == {"val/loss", "val/ppl"}


def test_mask_id_is_appended_and_specials_never_masked(mlm_task):
    """[MASK] is the id after the data's vocabulary; <eos> (the word vocabulary's special) is never
    selected."""
    assert mlm_task.mask_id == mlm_task.data.vocab_size == mlm_task.model.vocab_size - 1
    assert mlm_task.special
    for _ in range(5):
        inputs, targets = mlm_task.next_batch()
        assert not (targets[torch.isin(targets, torch.tensor(mlm_task.special))]).numel()
        assert int(inputs.max()) <= mlm_task.mask_id


def test_the_loss_counts_only_masked_positions(mlm_task):
    """Changing the targets' logits at unmasked positions leaves the loss as it is; the loss is the
    mean NLL over masked positions."""
    inputs, targets = mlm_task.next_batch()
    logits = torch.randn(*inputs.shape, mlm_task.model.vocab_size)

    class Fixed(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, x):
            return self.out, [None]

    _, ce, _, _ = mlm_task.loss(Fixed(logits), (inputs, targets), False)
    other = logits.clone()
    other[targets == IGNORE] = torch.randn_like(other[targets == IGNORE])
    _, ce2, _, _ = mlm_task.loss(Fixed(other), (inputs, targets), False)
    sel = targets != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[sel], targets[sel])
    assert torch.allclose(ce, ce2) and torch.allclose(ce, expected)


def test_a_tiny_mlm_run_lowers_val_ppl(train_run, tmp_path):
    """Through the trainer: val/ppl falls; no bpc or word-level perplexity; routing metrics under
    the LM's names."""
    summary, records = train_run(
        tmp_path,
        "task=mlm",
        "data=wikitext2_word",
        "model=moa",
        "trainer.max_steps=60",
        "trainer.eval_interval=20",
        "trainer.batch_size=8",
        "trainer.eval_iters=4",
        "optim.lr=3e-3",
    )
    vals = [r["val/ppl"] for r in records if "val/ppl" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]
    keys = set().union(*records)
    assert not any(k.endswith(("/bpc", "/word_ppl")) for k in keys | set(summary))
    assert "routing/entropy/layer0" in keys
    assert {"test/loss", "test/ppl"} <= set(summary)
    assert summary["summary_keys"] == ["val/loss", "val/ppl", "test/loss", "test/ppl"]


def test_load_run_and_eval_only_and_generate_refusal(train_run, tmp_path, cli):
    from moa_train.api import load_checkpoint_model, load_run

    run = tmp_path / "run"
    train_run(run, "task=mlm", "data=wikitext2_word", "model=mha", "trainer.max_steps=4")
    model, cfg = load_run(run)
    assert cfg.task.name == "mlm" and type(model).__name__ == "MaskedLM"
    with pytest.raises(ValueError, match="is a mlm run"):
        load_checkpoint_model(run, lm_only=True)
    code, out, _ = cli(
        "trainer.eval_only=true", f"trainer.resume={run}", f"hydra.run.dir={tmp_path / 'ev'}"
    )
    assert code == 0, out
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {"val/loss", "val/ppl", "test/loss", "test/ppl"} <= set(ev) and "val/bpc" not in ev


MLM_ROWS = sorted(p.stem for p in (config_dir() / "experiment" / "moa_mlm").glob("[!_]*.yaml"))


@pytest.mark.parametrize("name", MLM_ROWS)
def test_every_moa_mlm_experiment_composes_and_builds(name, compose_cfg):
    from moa_train.train.tasks import validate

    cfg = compose_cfg(f"experiment=moa_mlm/{name}")
    validate(cfg)
    assert cfg.task.name == "mlm"
    model = task_class("mlm").build_model(cfg.model, 1000)
    assert model.flops_per_token(cfg.trainer.block_size) > 0


def fake_run(folder, row: str, seed: int, ppl: float, entropy: float = 1.0):
    run = folder / f"{row}-seed{seed}"
    run.mkdir(parents=True)
    summary = {
        "val/ppl": ppl,
        "test/ppl": ppl + 1,
        "params_total": 1000,
        "flops_per_token": 6000,
        "device_name": "cpu",
        "torch_version": "x",
        "git_sha": "abcdef0",
        "steps": 10,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    record = {"step": 10, "routing/entropy/layer0": entropy, "routing/util/layer0/e0": 0.6}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")


def test_the_mlm_table_reports_rows_and_the_trend(tmp_path):
    """--tables-only: mean +- std per row, MACs per token from the FLOP counter (/ 6), routing per
    layer, and the trend statement: a clear fall with E is significant, the head-size series with
    one row is said to be missing."""
    from moa_train.results.mlm import main

    runs = tmp_path / "runs"
    for seed in range(3):
        for row, ppl in (("moa_e4", 30.0), ("moa_e8", 25.0), ("moa_e16", 20.0)):
            fake_run(runs, row, seed, ppl + 0.1 * seed)
    main(["--tables-only", "--runs-dir", str(runs), "--out", str(tmp_path / "mlm")])
    res = json.loads((tmp_path / "mlm.json").read_text())["results"]
    e8 = res["rows"]["moa_e8"]
    assert e8["val_ppl"]["mean"] == pytest.approx(25.1) and e8["val_ppl"]["std"] > 0
    assert e8["macs_per_token"] == 1000 and e8["routing"]["layer0"]["util_max"] == 0.6
    experts, heads = res["trends"]
    assert experts["holds"] is True and experts["p"] < 0.05
    assert heads["holds"] is None
    md = (tmp_path / "mlm.md").read_text()
    assert "| moa_e8 | 3 | 1,000 | 1,000 | 25.10 +- 0.10 | 26.10 +- 0.10 |" in md
    assert "the paper's trend holds here." in md
