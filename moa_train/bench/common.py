"""What the training benchmark (train.py) and the inference benchmark (decode.py) both use: the
model sizes and the config composed for them, device sync, memory release between models, the
results file, table cells."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from moa_train.config import applicable
from moa_train.paths import config_dir

# table1 rows reuse the MoAS Table 1 experiment of their name where there is one, the others take
# its sizes via mha's
TABLE1 = config_dir() / "experiment" / "moas_table1"

# sizes: (overrides, default batch). Fast mode everywhere: bf16, TF32, compile, whole-step CUDA
# graph.
SIZES = {
    "table1": (["data=wikitext2_char", "mode=fast"], 12),
    "gpt2": (
        [
            "~experiment",
            "data=random_tokens",
            "mode=fast",
            "model.n_layer=12",
            "model.d_model=768",
            "model.n_head=12",
            "model.max_seq_len=1024",
            "trainer.block_size=1024",
            "model.dropout=0.0",
            # each model takes the keys it owns (registry.applicable)
            "model.gate_dropout=0.0",
        ],
        64,
    ),
    # for CI on a CPU: seconds per model; a variant's own tiny sizes from
    # configs/debug_model/tiny_<model>.yaml
    "tiny": (
        [
            "~experiment",
            "debug=tiny",
            "data=random_tokens",
            "data.vocab_size=256",
            "model.n_layer=2",
            "model.d_model=64",
            "model.n_head=4",
            "model.max_seq_len=64",
            "trainer.block_size=64",
        ],
        4,
    ),
}
ALWAYS = [
    "trainer.max_steps=1000000",
    "trainer.eval_interval=1000000",
    "trainer.log_interval=1000000",
    "trainer.resume=false",
]
# CPU: the plain step
CPU = ["trainer.precision=fp32", "trainer.compile=false", "trainer.cuda_graphs=false"]


def compose_cfg(size: str, model: str, batch: int, device: torch.device, extra: list = ()):
    from moa_train.config import compose_train
    from moa_train.train.tasks import validate

    overrides = [*applicable(model, SIZES[size][0]), f"model={model}"]
    if size == "table1":
        row = model if (TABLE1 / f"{model}.yaml").is_file() else "mha"
        overrides.insert(0, f"experiment=moas_table1/{row}")
    overrides += ALWAYS + [f"trainer.batch_size={batch}", f"trainer.device={device.type}", *extra]
    if device.type == "cpu":
        overrides += CPU
    cfg = compose_train(overrides)
    validate(cfg)
    return cfg, overrides


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free a finished (or failed) model's memory and compiled graphs before the next one is built:
    the trainer holds a reference to itself (its compiled bound method), so only a collection frees
    it."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}, "results": {}}
