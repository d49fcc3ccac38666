"""WikiText (the tokenized v1 release): `wikitext-<size>/{train,valid,test}.txt` under the data
folder, or the `datasets` hub's Salesforce/wikitext copy. WikiText-2 is the MoAS paper's LM corpus
(char, word and BPE runs), WikiText-103 the MoA paper's MLM corpus; both are entries of the LM
corpus table (data/corpora.py)."""

from __future__ import annotations

from moa_train.data.text_corpus import TextCorpus


def wikitext(size: str) -> TextCorpus:
    """WikiText-`size` (2 or 103): wikitext-<size>/{train,valid,test}.txt, or the hub's
    Salesforce/wikitext wikitext-<size>-v1."""
    return TextCorpus(
        f"wikitext{size}",
        f"wikitext-{size}",
        {"train": "train.txt", "val": "valid.txt", "test": "test.txt"},
        ("Salesforce/wikitext", f"wikitext-{size}-v1"),
        {"train": "train", "val": "validation", "test": "test"},
    )


WIKITEXT2 = wikitext("2")
# the MoA paper's MLM corpus: the same layout, about 50x WikiText-2's training text
WIKITEXT103 = wikitext("103")


def __getattr__(name: str):
    """`moa_train.data.wikitext.LM_CORPORA`, the path plugins were documented to add corpora
    through (the table now lives in data/corpora.py, which imports this module)."""
    if name == "LM_CORPORA":
        from moa_train.data.corpora import LM_CORPORA

        return LM_CORPORA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
