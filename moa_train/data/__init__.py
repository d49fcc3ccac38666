from moa_train.data.corpora import load_corpus
from moa_train.data.corpus import DataError  # noqa: F401
from moa_train.data.root import resolve_root  # noqa: F401
from moa_train.data.tokens import TokenData


def load_data(cfg) -> "TokenData":
    """Token streams for an LM data config (data.name: an LM_CORPORA key | random_tokens)."""
    if cfg.name == "random_tokens":
        from moa_train.data.synthetic import load_random_tokens

        return load_random_tokens(cfg)
    return load_corpus(cfg)


def check_files(data_cfg) -> None:
    """A DataError (one line: the one the run would end with) where the files of data_cfg's corpus
    cannot be had: a data folder lacking them (the file is named), data=text without data.root,
    a recorded data folder that is gone, or no data folder and a download that evidently cannot
    work (offline: no download is tried). Nothing is read, tokenized or downloaded, and it takes
    about a second at most (the network probe), so a check before the run folder is made can call
    it."""
    if data_cfg.name == "random_tokens":
        return
    if "translation" in data_cfg.get("tasks", ()):
        from moa_train.data.translation import check_files as check_translation

        check_translation(data_cfg)
        return
    from moa_train.data.corpora import check_files as check_lm

    check_lm(data_cfg)
