from moa_train.data.wikitext import DataError, TokenData, load_wikitext2  # noqa: F401


def load_data(cfg) -> "TokenData":
    """Token streams for an LM data config (data.name: wikitext2_* | random_tokens)."""
    if cfg.name == "random_tokens":
        from moa_train.data.synthetic import load_random_tokens

        return load_random_tokens(cfg)
    return load_wikitext2(cfg)
