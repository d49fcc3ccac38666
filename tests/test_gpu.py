"""Fast paths on the GPU against the plain path (skipped without CUDA; run on a GPU machine with
`python3 -m pytest tests/test_gpu.py`)."""

import pytest
import torch

from moa_train.config import applicable

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

COMMON = (
    "trainer.device=cuda",
    "optim.lr=3e-3",
    "model.dropout=0.0",
    "model.gate_dropout=0.0",
    "trainer.max_steps=12",
    "trainer.log_interval=1",
    "trainer.eval_interval=12",
    "model.n_head=4",
)
# MoA with k = E: with k < E and the router initialised at zero every token starts on exact ties, so
# rounding-level differences (the capturable AdamW keeps its bias correction on the device) flip
# expert choices and the runs part ways for reasons unrelated to the capture. k = E exercises the
# same top-k, gather and scatter code continuously.
MODELS = {"mha": (), "moas_dynamic": (), "moa": ("model.n_experts=4", "model.top_k=4")}


def losses(records):
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graph_step_equals_eager(train_run, tmp_path, model, compiled):
    """The captured optimizer step (warm-up, capture, replays) trains like the eager loop."""
    extra = (
        f"model={model}",
        *MODELS[model],
        f"trainer.compile={compiled}",
        *applicable(model, COMMON),
        "trainer.grad_accum=2",
    )
    _, eager = train_run(tmp_path / "eager", *extra)
    _, graphed = train_run(tmp_path / "graph", *extra, "trainer.cuda_graphs=true")
    assert len(losses(graphed)) == 12
    assert losses(graphed) == pytest.approx(losses(eager), abs=2e-4)
    assert losses(graphed)[-1] < losses(graphed)[0] - 0.1


# --- non-finite steps and resume on the GPU -------------------------------------------------------


@pytest.fixture
def poison(monkeypatch):
    """poison(steps): the training loss is multiplied by a device scalar that is NaN during those
    (1-based) steps; a tensor read by the captured graph, so the injection reaches replays too.
    Non-log steps after the capture run with CUDA's sync debug mode set to error: a host sync there
    fails the test."""
    from moa_train.train.loop import Trainer
    from moa_train.train.tasks import LMTask

    factor = torch.ones((), device="cuda")
    original_loss, original_step = LMTask.loss, Trainer.train_step

    def loss(self, model, batch, all_aux):
        total, *rest = original_loss(self, model, batch, all_aux)
        return (total * factor, *rest)

    def _set(steps):
        def train_step(self, log_step, batches=None):
            factor.fill_(float("nan") if self.step + 1 in steps else 1.0)
            torch.cuda.set_sync_debug_mode(
                "error" if self.step >= 5 and not log_step else "default"
            )
            try:
                return original_step(self, log_step, batches)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        monkeypatch.setattr(LMTask, "loss", loss)
        monkeypatch.setattr(Trainer, "train_step", train_step)

    return _set


@pytest.mark.parametrize("graphs", [False, True])
def test_non_finite_steps_are_skipped_without_a_sync(train_run, tmp_path, poison, graphs):
    extra = (
        "model=mha",
        *applicable("mha", COMMON),
        "trainer.log_interval=4",
        "trainer.eval_interval=100",
        "trainer.max_steps=12",
        "trainer.seed=1",
    )
    _, clean = train_run(tmp_path / "clean", *extra, f"trainer.cuda_graphs={graphs}")
    poison({6, 7})
    summary, records = train_run(tmp_path / "poisoned", *extra, f"trainer.cuda_graphs={graphs}")
    assert summary["skipped_steps"] == 2
    assert [r["train/skipped_steps"] for r in records if "train/loss" in r] == [0, 2, 2]
    assert all(r["train/loss"] == r["train/loss"] for r in records if "train/loss" in r)  # no NaN
    assert losses(records)[0] == losses(clean)[0]  # steps 1-4 as the clean run's
    # two steps were left out
    assert losses(records)[-1] != pytest.approx(losses(clean)[-1], abs=1e-6)


def test_resume_with_cuda_graphs(train_run, tmp_path):
    extra = (
        "model=mha",
        *applicable("mha", COMMON),
        "trainer.cuda_graphs=true",
        "trainer.eval_interval=5",
    )
    _, straight = train_run(tmp_path / "straight", *extra, "trainer.max_steps=15")
    train_run(tmp_path / "split", *extra, "trainer.max_steps=10")
    _, resumed = train_run(tmp_path / "split", *extra, "trainer.max_steps=15")
    assert losses(resumed) == pytest.approx(losses(straight), abs=2e-4)


def test_translation_resumes_on_the_gpu(compose_cfg, tmp_path):
    """A translation run resumes from a checkpoint loaded onto the GPU: the loader's generator
    state, moved there with the checkpoint, goes back to the CPU (every resumed translation run on
    CUDA failed with 'RNG state must be a torch.ByteTensor')."""
    from moa_train.train.loop import train
    from test_translation_train import write_copy_corpus

    root = write_copy_corpus(tmp_path / "data")
    args = (
        "experiment=multi30k/mha",
        "debug=tiny",
        "data=wmt14_en_de",
        f"data.root={root}",
        "data.vocab_size=300",
        "trainer.device=cuda",
        "trainer.save_interval=5",
        "trainer.eval_interval=5",
    )
    train(compose_cfg(*args, "trainer.max_steps=5"), tmp_path / "run")
    summary = train(compose_cfg(*args, "trainer.max_steps=10"), tmp_path / "run")
    assert summary["steps"] == 10


@pytest.mark.parametrize("variant", ["mha", "gqa", "moas_dynamic", "moas_dynamic_top1", "moa_topk"])
def test_decode_step_captured_in_a_cuda_graph_equals_eager(variant):
    """The static cache lets a decode step be compiled with CUDA graphs (mode="reduce-overhead"): 16
    captured steps give the eager steps' logits (fp32, TF32 off: atol 1e-3 on logits of order 0.1-1;
    in bf16 the compiled kernels' different fusion moved logits by up to 0.023 on the H200)."""
    from test_kv_cache import build, tokens

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    lm = build(variant).cuda()
    # fixed inputs: no argmax ties to diverge on
    prompt, feed = tokens(4, 6).cuda(), tokens(4, 16, seed=2).cuda()
    step = torch.compile(lm.decode_step, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        outs = []
        for fn in (lm.decode_step, step):
            cache = lm.init_cache(4, 24)
            logits = lm.prefill(prompt, torch.full((4,), 6, device="cuda"), cache)
            seen = []
            for i in range(16):
                logits = fn(feed[:, i], cache)
                seen.append(logits.float().clone())
            outs.append(torch.stack(seen))
    assert torch.allclose(outs[0], outs[1], atol=1e-3), (outs[0] - outs[1]).abs().max()
