"""The layout of saved configs and checkpoints, versioned, with the steps that upgrade older ones.

A run's config (its checkpoints' and .hydra/config.yaml) records `config_format`, and `upgrade`
brings an older one to the current layout through the steps of `STEPS`; a checkpoint records
`checkpoint_format`, and `upgrade_checkpoint` (which moa_train.train.checkpoint.load_checkpoint
applies to every file it reads) brings an older one to the current layout through
`CHECKPOINT_STEPS`. One step per version, so the rest of the code reads one layout only: a change
of layout is one new step here and its format + 1. This module imports neither torch nor the
models.
"""

from __future__ import annotations

import copy

CONFIG_FORMAT = 2

# format 1 -> 2: translation's keys moved under task.* (its own config, TranslationConfig); every
# CLI path that moved, old -> new (docs/tasks.md lists them; cli.describe names the new path)
MOVED = {
    "data.src": "task.src",
    "data.tgt": "task.tgt",
    "data.max_tokens": "task.max_tokens",
    "data.max_len": "task.max_len",
    "trainer.label_smoothing": "task.label_smoothing",
    "trainer.label_smoothing_over": "task.label_smoothing_over",
    "eval.beam": "task.beam",
    "eval.lenpen": "task.lenpen",
    "eval.val_beam": "task.val_beam",
    "eval.max_len_a": "task.max_len_a",
    "eval.max_len_b": "task.max_len_b",
    "eval.max_sentences": "task.max_sentences",
    "eval.kv_cache": "task.kv_cache",
    "eval.average_last": "task.average_last",
}
# moved keys that every task has (the others are translation's)
COMMON_MOVED = {"eval.average_last"}


def _pop(config: dict, key: str):
    node, _, leaf = key.rpartition(".")
    parent = config.get(node)
    return parent.pop(leaf, None) if isinstance(parent, dict) else None


def _model_v1(model: dict, model_keys) -> dict:
    """A format-1 model node: configs written before variants owned their keys hold every variant's
    keys (the others' were unused: dropped; `model_keys(name)` names the variant's own, None for a
    variant this process does not know, whose keys stay) and name a decoder's cross-attention
    variant in `cross_attention` (now `cross.name`)."""
    if "cross_attention" in model:
        model["cross"] = {"name": model.pop("cross_attention")}
    owned = model_keys(model.get("name"))
    return model if owned is None else {k: v for k, v in model.items() if k in owned}


def _v1(config: dict, default_task, model_keys) -> dict:
    """Format 1 (no config_format key): translation's keys in data, trainer and eval; the task in
    data.task (or nowhere: configs written before tasks were named take their data's default, from
    `default_task(data name)`). Keys a task does not own are dropped (they were unused); so are
    those of other variants in the model node (`_model_v1`). `optim.fused: null` meant "fused AdamW
    where the device has it", which every device here now has: true."""
    if isinstance(config.get("model"), dict):
        config["model"] = _model_v1(config["model"], model_keys)
    if isinstance(config.get("optim"), dict) and config["optim"].get("fused", False) is None:
        config["optim"]["fused"] = True
    data = config.setdefault("data", {})
    named = (config.get("task") or {}).get("name")
    if isinstance(named, str) and named.startswith("${"):  # `${data.task}`, unresolved as saved
        named = None
    task = named or data.get("task") or default_task(data["name"])
    moved = {new: _pop(config, old) for old, new in MOVED.items()}
    keep = {k for k, v in moved.items() if v is not None}
    if task != "translation":
        keep &= {MOVED[k] for k in COMMON_MOVED}
    config["task"] = {"name": task, **{k.partition(".")[2]: moved[k] for k in sorted(keep)}}
    data.pop("task", None)
    data["tasks"] = [task]
    if not config.get("eval", True):
        config.pop("eval")
    return config


STEPS = {1: _v1}  # format N -> N + 1


def upgrade(
    config: dict, default_task=lambda data_name: "lm", model_keys=lambda variant: None
) -> dict:
    """A copy of saved config `config` (a plain dict) in the current layout. `default_task`: the
    default task of a data set by name, for configs that predate named tasks; `model_keys`: the
    keys an attention variant's config owns, by name (None: unknown, its keys kept), for configs
    that predate variants owning their keys."""
    config = copy.deepcopy(config)
    version = config.get("config_format", 1)
    if version > CONFIG_FORMAT:
        raise ValueError(
            f"config_format {version} is newer than this moa_train reads ({CONFIG_FORMAT}); "
            "update moa_train"
        )
    while version < CONFIG_FORMAT:
        config = STEPS[version](config, default_task, model_keys)
        version += 1
    config["config_format"] = CONFIG_FORMAT
    return config


# --- checkpoints ----------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 2


def _checkpoint_v1(state: dict) -> dict:
    """Format 1 (no checkpoint_format key): each key added since the first checkpoints may be
    missing, and the state it records then is the one a fresh run starts from: no tokens counted,
    no wandb run, no validation pending, no wall-clock time kept (this session's only), no step
    skipped (written before non-finite steps were skipped), an empty logged-loss window, early
    stopping not waiting, a health that is sane (written before health was recorded), no padding
    id and no tokenizer recorded."""
    fresh = {
        "tokens_seen": 0,
        "wandb_id": None,
        "pending_eval": False,
        "wall_s": 0.0,
        "guard": {"skipped": 0, "streak": 0, "longest": 0},
        "window": {"ce": 0.0, "applied": 0, "aux": {}},
        "early_stopping": {"best": float("inf"), "best_step": None, "waited": 0},
        "health": {"sane": True, "val": None},
        "last_sane": None,
        "pad_id": None,
        "tokenizer": None,
    }
    state = {**fresh, **state}
    if "rng" in state:
        state["rng"] = _rng_v1(state["rng"])
    return state


def _rng_v1(rng):
    """Checkpoints written before multi-GPU support hold every visible device's CUDA generator (a
    list) where the current layout holds the writing process's current device's (one tensor). That
    process never chose a device, so its current device was the first: entry 0 is what the current
    code would have saved. Per-rank lists of states (torchrun) are upgraded state by state."""
    if isinstance(rng, list):
        return [_rng_v1(one) for one in rng]
    if not isinstance(rng, dict) or not isinstance(rng.get("cuda"), (list, tuple)):
        return rng
    devices = rng["cuda"]
    return {**rng, "cuda": devices[0]} if devices else {k: v for k, v in rng.items() if k != "cuda"}


CHECKPOINT_STEPS = {1: _checkpoint_v1}  # format N -> N + 1


def upgrade_checkpoint(state: dict) -> dict:
    """Checkpoint state `state` in the current layout: a new dict (the tensors are shared, not
    copied). ValueError for a format newer than this code reads."""
    version = state.get("checkpoint_format", 1)
    if version > CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint_format {version} is newer than this moa_train reads "
            f"({CHECKPOINT_FORMAT}); update moa_train"
        )
    while version < CHECKPOINT_FORMAT:
        state = CHECKPOINT_STEPS[version](state)
        version += 1
    return {**state, "checkpoint_format": CHECKPOINT_FORMAT}
