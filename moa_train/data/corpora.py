"""The LM corpus table: `data.name` -> the TextCorpus it reads (data/text_corpus.py), and loading
the one a data config names. A new corpus is one `LM_CORPORA` entry and one
`configs/data/<name>.yaml`; from outside the package, a plugin adds the entry
(moa_train/plugins.py)."""

from __future__ import annotations

from moa_train.data.corpus import table_entry
from moa_train.data.text_corpus import TextCorpus, check_text_files, load_text_corpus
from moa_train.data.tokens import TokenData
from moa_train.data.wikitext import WIKITEXT2, WIKITEXT103

# data=text: a folder of the user's own (data.root), any tokenizer
TEXT = TextCorpus(
    "text",
    "",
    {"train": "train.txt", "val": ("valid.txt", "validation.txt", "val.txt"), "test": "test.txt"},
)
# data.name -> corpus; the three WikiText-2 configs differ in data.tokenizer only
LM_CORPORA = {
    "wikitext2_char": WIKITEXT2,
    "wikitext2_word": WIKITEXT2,
    "wikitext2_bpe": WIKITEXT2,
    "wikitext103_word": WIKITEXT103,
    "wikitext103_bpe": WIKITEXT103,
    "text": TEXT,
}


def lm_corpus(name: str) -> TextCorpus:
    return table_entry(LM_CORPORA, name, "an LM corpus")


def check_files(cfg) -> None:
    """DataError (the one line the run would end with) where the corpus' files cannot be had:
    missing under the data folder, or neither there nor downloadable (offline). Nothing is read
    or downloaded: a check before the run."""
    check_text_files(cfg, lm_corpus(cfg.name))


def load_corpus(cfg) -> TokenData:
    """The LM corpus `LM_CORPORA[data.name]`, tokenized by data.tokenizer and split by
    data.split."""
    return load_text_corpus(cfg, lm_corpus(cfg.name))
