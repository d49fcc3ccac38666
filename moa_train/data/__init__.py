from moa_train.data.corpus import DataError  # noqa: F401
from moa_train.data.wikitext import TokenData, load_corpus


def load_data(cfg) -> "TokenData":
    """Token streams for an LM data config (data.name: an LM_CORPORA key | random_tokens)."""
    if cfg.name == "random_tokens":
        from moa_train.data.synthetic import load_random_tokens

        return load_random_tokens(cfg)
    return load_corpus(cfg)


def check_files(cfg) -> None:
    """A DataError naming the first file of a data config's corpus that is missing, empty or
    unreadable in data.root, found without reading or downloading anything: the checks the load
    starts with, which the entry point runs before the run folder is written. random_tokens reads
    no file; a corpus still to be downloaded is checked when it is."""
    from moa_train.data import translation, wikitext

    wikitext.check_files(cfg)
    translation.check_files(cfg)
