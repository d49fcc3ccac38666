from moa_train.data.corpus import DataError  # noqa: F401
from moa_train.data.wikitext import TokenData, load_corpus


def load_data(cfg) -> "TokenData":
    """Token streams for an LM data config (data.name: an LM_CORPORA key | random_tokens)."""
    if cfg.name == "random_tokens":
        from moa_train.data.synthetic import load_random_tokens

        return load_random_tokens(cfg)
    return load_corpus(cfg)
