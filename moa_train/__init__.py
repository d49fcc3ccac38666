"""moa_train: training language models whose attention layers are mixtures (MHA/GQA/MQA, MoAS,
MoA)."""

__version__ = "0.1.0"

# Nothing is imported here, so that the leaf helpers (moa_train.paths, moa_train.io, ...) load
# without torch; the variants and tasks register their schemas when moa_train.config is imported.


def load_run(run_dir, map_location: str = "cpu"):
    """(model with the run's latest checkpoint weights, config): see moa_train.api.load_run."""
    from moa_train.api import load_run as _load_run

    return _load_run(run_dir, map_location)


def load_tokenizer(run_dir):
    """The tokenizer saved in a run folder (tokenizer.json): see moa_train.api.load_tokenizer."""
    from moa_train.api import load_tokenizer as _load_tokenizer

    return _load_tokenizer(run_dir)


def generate(model, tokenizer, prompts, **kwargs):
    """Completions of `prompts` from a decoder-only LM: see moa_train.generation.generate."""
    from moa_train.generation import generate as _generate

    return _generate(model, tokenizer, prompts, **kwargs)
