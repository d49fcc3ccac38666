"""Python API over run folders."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def load_run(run_dir: str | Path, map_location: str = "cpu") -> tuple:
    """(model with the weights of the run's latest checkpoint that verifies and reads, in eval mode;
    the run's resolved config). A damaged checkpoint is skipped with a warning, as a resume does;
    nothing is locked or written, and nothing in the file runs (weights_only loading). The modules
    in MOA_PLUGINS are loaded first, so a run of a plugin's variant rebuilds."""
    model, cfg, _ = load_checkpoint_model(run_dir, map_location)
    return model, cfg


def load_checkpoint_model(
    target: str | Path, map_location: str = "cpu", lm_only: bool = False
) -> tuple:
    """(model in eval mode, resolved config, checkpoint path) of a checkpoint file, or of a run
    folder's latest checkpoint that verifies and reads (load_run's choice). `lm_only`: refuse a task
    other than the decoder-only LM (ValueError) before building anything."""
    from moa_train.registration import ensure_registered
    from moa_train.train.checkpoint import checkpoints_in, load_latest
    from moa_train.train.tasks import saved_config, task_class

    ensure_registered(plugins=True)
    target = Path(target)
    if not checkpoints_in(target):
        raise FileNotFoundError(f"no checkpoint under {target} (expected checkpoints/step_*.pt)")
    path, state, _ = load_latest(target, map_location, key="load_run")
    # resolved as the run used it (env vars included), in the current layout
    cfg: DictConfig = OmegaConf.create(saved_config(state["config"]))
    name = cfg.task.name
    if lm_only and name != "lm":
        raise ValueError(
            f"{target} is a {name} run: only decoder-only LM runs (task lm) are supported for now"
        )
    model = task_class(name).build_model(cfg.model, state["vocab_size"], state["pad_id"])
    model.load_state_dict(state["model"])
    # what generate checks a tokenizer against (generation.check_tokenizer); checkpoints written
    # before the tokenizer was recorded hold None (moa_train/config_format.py)
    model.checkpoint_path, model.tokenizer_identity = path, state["tokenizer"]
    return model.to(map_location).eval(), cfg, path


def load_tokenizer(run_dir: str | Path):
    """The tokenizer a run saved in its folder (tokenizer.json: a char or word vocabulary, or
    tokenizers' BPE file), with encode, decode and vocab_size, and `source` (the file) and
    `identity` (its sha256 and vocabulary size, which generate compares with what the model's
    checkpoint records). JSON only: nothing in the file runs. FileNotFoundError (one line) for a
    run folder without one (runs started before tokenizers were saved); ValueError (one line naming
    the file) for one that is not UTF-8, not JSON or not a tokenizer."""
    from moa_train.data.corpus import utf8
    from moa_train.data.tokenizer import TOKENIZER_FILE, tokenizer_from_json, tokenizer_identity

    path = Path(run_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the run predates saved tokenizers (or is not an LM run); "
            "train a new run to generate from it"
        )
    raw = path.read_bytes()
    tokenizer = tokenizer_from_json(utf8(raw, str(path)), str(path))
    tokenizer.source, tokenizer.identity = str(path), tokenizer_identity(raw, tokenizer.vocab_size)
    return tokenizer


__all__ = ["load_checkpoint_model", "load_run", "load_tokenizer"]
