"""Translation end to end on a tiny copy task (target = source): mha (4 heads) and moa (4 of 8
experts) both learn it to a high BLEU."""

import random
from contextlib import nullcontext

import pytest
import torch

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
]


def write_copy_corpus(root, n_train=2000, n_eval=40):
    rng = random.Random(0)
    folder = root / "wmt14-en-de"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]
        for lang in ("en", "de"):
            (folder / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def copy_root(tmp_path_factory):
    return write_copy_corpus(tmp_path_factory.mktemp("copy"))


@pytest.mark.slow
# moa's one shared K/V head aligns slower
@pytest.mark.parametrize("model,steps", [("mha", 300), ("moa", 600)])
def test_copy_task_reaches_high_bleu(compose_cfg, copy_root, tmp_path, model, steps):
    from moa_train.config import applicable
    from moa_train.train.loop import train
    from moa_train.train.tasks import validate

    sizes = applicable(
        model,
        [
            "model.d_model=64",
            "model.n_head=4",
            "model.head_dim=16",
            "model.n_layer=2",
            "model.n_encoder_layer=2",
            "model.dropout=0.0",
            "model.n_experts=8",
            "model.top_k=4",
        ],
    )
    cfg = compose_cfg(
        f"experiment=multi30k/{model}",
        "data=wmt14_en_de",
        f"data.root={copy_root}",
        "data.vocab_size=300",
        "task.max_tokens=1200",
        *sizes,
        "optim.lr=3e-3",
        "schedule.warmup_steps=30",
        f"trainer.max_steps={steps}",
        f"trainer.eval_interval={steps}",
        "trainer.log_interval=50",
        "trainer.save_interval=100",
        "trainer.device=cpu",
        "task.beam=2",
        "task.average_last=2",
        "task.label_smoothing=0.0",
    )
    validate(cfg)
    summary = train(cfg, tmp_path)
    assert summary["test/bleu"] > 80, summary
    assert summary["test/chrf"] > 80
    assert summary["test/averaged_checkpoints"] == 2
    assert "tok:13a" in summary["bleu_signature"]
    import moa_train
    from moa_train.models.seq2seq import Seq2Seq

    loaded, _ = moa_train.load_run(tmp_path)  # a translation run loads as the encoder-decoder
    assert isinstance(loaded, Seq2Seq) and not loaded.training

    # the last checkpoint, not averaged
    cfg.trainer.eval_only, cfg.trainer.resume = True, str(tmp_path)
    evaluated = train(cfg, tmp_path / "eval_only")
    assert evaluated["test/bleu"] > 80 and "val/bleu" in evaluated, evaluated
    check_saved_without_a_task(compose_cfg, copy_root, tmp_path)


def check_saved_without_a_task(compose_cfg, copy_root, run_dir):
    """A checkpoint written before tasks were named (config format 1: no task node, no data.task,
    translation's keys in data, trainer and eval) is still a translation run: its data config
    names the task, and config_format's upgrade puts the keys under task.*. load_run rebuilds the
    encoder-decoder; eval_only from an LM command evaluates it."""
    import moa_train
    from moa_train.models.seq2seq import Seq2Seq
    from moa_train.train.checkpoint import atomic_save, load_checkpoint, step_checkpoints
    from moa_train.train.loop import train

    newest = step_checkpoints(run_dir / "checkpoints")[-1]
    state = load_checkpoint(newest)
    old = state["config"]  # back to format 1, from before tasks were named
    task = old.pop("task")
    del old["config_format"], old["data"]["tasks"]
    old["data"].update({k: task.pop(k) for k in ("src", "tgt", "max_tokens", "max_len")})
    old["trainer"].update({k: task.pop(k) for k in ("label_smoothing", "label_smoothing_over")})
    # format 1's eval node held only the keys that moved from it (later task keys did not exist)
    from moa_train.config_format import MOVED

    moved = [new.partition(".")[2] for key, new in MOVED.items() if key.startswith("eval.")]
    old["eval"] = {k: task[k] for k in moved if k in task}
    atomic_save(state, newest)
    assert isinstance(moa_train.load_run(run_dir)[0], Seq2Seq)
    cfg = compose_cfg(
        "trainer.device=cpu",
        "trainer.eval_only=true",
        f"trainer.resume={newest}",
        f"data.root={copy_root}",
    )
    assert cfg.task.name == "lm"
    evaluated = train(cfg, run_dir / "old_eval")
    assert evaluated["test/bleu"] > 80, evaluated


def test_debug_tiny_makes_a_translation_experiment_a_smoke_run(cli, tmp_path):
    """`experiment=multi30k/mha debug=tiny` composes and runs as given (no task.max_len to add),
    decoding only the first task.max_sentences valid/test sentences; the loss still covers the whole
    split."""
    import json

    rng = random.Random(1)
    folder = tmp_path / "data" / "multi30k"
    folder.mkdir(parents=True)
    for stem, n in (("train", 300), ("val", 50), ("test_2016_flickr", 40)):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]
        for lang in ("en", "de"):
            (folder / f"{stem}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, output, _ = cli(
        "experiment=multi30k/mha",
        f"data.root={tmp_path / 'data'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.vocab_size=300",
    )
    assert code == 0, output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 20
    assert summary["val/bleu_sentences"] == summary["test/bleu_sentences"] == 16
    assert "first 16 of 50 sentences" in output and "first 16 of 40 sentences" in output


def test_max_sentences_bounds_decoding_not_the_loss(compose_cfg, copy_root, tmp_path):
    from moa_train.train.tasks import TranslationTask

    cfg = compose_cfg(
        "experiment=multi30k/mha",
        "debug=tiny",
        "data=wmt14_en_de",
        f"data.root={copy_root}",
        "data.vocab_size=300",
        "trainer.device=cpu",
    )
    task = TranslationTask(cfg, torch.device("cpu"))
    decoded = []
    original = task._decode
    task._decode = lambda data, *a: decoded.append(len(data)) or original(data, *a)
    bounded = task.evaluate(task.model, "val", "val", nullcontext)
    cfg.task.max_sentences = None
    full = task.evaluate(task.model, "val", "val", nullcontext)
    assert decoded == [16, 40]
    assert bounded["val/loss"] == full["val/loss"]  # the loss covers the whole split either way
    assert "val/bleu_sentences" not in full


def test_a_stop_signal_ends_translation_evaluation(compose_cfg, tmp_path):
    """Beam search over a split can take long: a signal noted by the trainer's StopSignals ends it
    before the next batch (it used to run to the end, however long)."""
    import signal
    from contextlib import nullcontext
    from types import SimpleNamespace

    import torch

    from moa_train.train.preemption import EvaluationStopped
    from moa_train.train.tasks import make_task

    root = write_copy_corpus(tmp_path / "data", n_train=200, n_eval=20)
    cfg = compose_cfg(
        "experiment=multi30k/mha",
        "data=wmt14_en_de",
        f"data.root={root}",
        "data.vocab_size=300",
        "model.d_model=32",
        "model.n_head=2",
        "model.n_layer=1",
        "model.n_encoder_layer=1",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    task = make_task(cfg, torch.device("cpu"))
    task.model.eval()
    calls = []
    task.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(EvaluationStopped):
        task.evaluate(
            task.model,
            "test",
            "test",
            nullcontext,
            final=True,
            stop=SimpleNamespace(received=signal.SIGTERM),
        )
    assert calls == []
    assert "val/bleu" in task.evaluate(
        task.model, "val", "val", nullcontext, stop=SimpleNamespace(received=None)
    )
