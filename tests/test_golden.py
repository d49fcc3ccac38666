"""Golden losses: the first training losses of tiny fixed-seed CPU runs, stored in
tests/golden/losses.json, so a change that alters the training numerics (initialisation, attention,
losses, optimizer, data order) fails here.

Each entry is the train/loss of steps 1..12 (log_interval 1) of `debug=tiny model.n_head=4` on the
synthetic WikiText of conftest.py, on one CPU thread. Tolerance: relative 1e-5, a hundred times the
spread measured between one and two threads (float reductions are split differently), far below what
a change of numerics moves.

A deliberate change of numerics regenerates the file (say why in the commit):

    PYTHONPATH=. python3 tests/test_golden.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import compose_train, read_jsonl, write_wikitext

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
MODELS = ("mha", "moas_dynamic", "moa")
STEPS = 12
REL = 1e-5


def golden_losses(model: str, data_root: Path, cache_dir: Path, run_dir: Path) -> list:
    from moa_train.train.loop import train
    from moa_train.train.tasks import validate

    cfg = compose_train(
        f"data.root={data_root}",
        f"data.cache_dir={cache_dir}",
        "debug=tiny",
        f"model={model}",
        "model.n_head=4",
        "trainer.device=cpu",
        f"trainer.max_steps={STEPS}",
        "trainer.log_interval=1",
        "trainer.eval_interval=1000",
        "trainer.seed=0",
    )
    validate(cfg)
    train(cfg, run_dir)
    return [r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


@pytest.mark.parametrize("model", MODELS)
def test_losses_match_the_golden_file(model, data_root, cache_dir, tmp_path):
    expected = json.loads(GOLDEN.read_text())["losses"][model]
    got = golden_losses(model, data_root, cache_dir, tmp_path)
    assert len(got) == len(expected) == STEPS
    assert got == pytest.approx(expected, rel=REL), (
        "training numerics changed; see this file's header"
    )


def regenerate() -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_root = write_wikitext(tmp / "data")
        losses = {m: golden_losses(m, data_root, tmp / "cache", tmp / m) for m in MODELS}
    GOLDEN.write_text(
        json.dumps({"torch": torch.__version__, "steps": STEPS, "losses": losses}, indent=1) + "\n"
    )
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    regenerate()
