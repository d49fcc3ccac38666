from moa_train.data.wikitext import DataError, TokenData, load_wikitext2  # noqa: F401


def load_data(cfg) -> "TokenData":
    """Token streams for an LM data config (data.name: wikitext2_*)."""
    return load_wikitext2(cfg)
