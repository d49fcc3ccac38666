"""An LM corpus as text files (`TextCorpus`: one plain-text file per split in one folder) read into
token streams (char, word or BPE), cached as memmaps. The corpora themselves are the table in
data/corpora.py.

Files: `<data folder>/<folder>/<file of each split>`, the data folder as data/root.py finds it
(data.root, MOA_DATA_DIR, the recorded one, ../shared/data); with none, the files are downloaded
once through `datasets` into the cache, where the network is evidently there (otherwise a one-line
error says how to set the data folder). A corpus of the user's own (folder "") reads `data.root`
itself.

Splits: `official` uses the valid/test files; `moas_paper` reproduces the MoAS paper's split (first
90% of the train file's characters for training, the last 10% as "validation"; test stays the
official test file). The split is made on the text, so char, word and BPE runs see the same
underlying characters.

Each split records how many characters and words its text holds (data/tokens.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moa_train.data.cache import CacheDamaged, check_ids, content_key, load_cached
from moa_train.data.corpus import DataError, check_readable, expand, read_text
from moa_train.data.root import download, find_root, how_to_set
from moa_train.data.tokenizer import (
    TOKENIZER_FILE,
    UNK,
    BPETokenizer,
    CharTokenizer,
    WordTokenizer,
    tokenizer_json,
)
from moa_train.data.tokens import Split, TokenData, word_count
from moa_train.progress import progress

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TextCorpus:
    """An LM corpus: one plain-text file per split in one folder."""

    cache: str  # its folder under data.cache_dir
    # under the data folder (and under <cache_dir>/download/); "": data.root itself, which must then
    # be given (a corpus of the user's own)
    folder: str
    # "train" | "val" | "test" -> its file name, or a tuple of names it may have (one must exist)
    files: dict
    hub: tuple = ()  # datasets.load_dataset arguments, for data.root=null; (): no download
    hub_splits: dict = field(default_factory=dict)  # split -> the hub's split name
    # the hub rows' text, joined as it is (WikiText's lines keep their "\n")
    hub_column: str = "text"


# --- locating the text ----------------------------------------------------------------------------


def _names(entry) -> tuple:
    """The file names a TextCorpus.files entry accepts."""
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _expected(corpus: TextCorpus) -> str:
    names = ",".join("|".join(_names(corpus.files[split])) for split in SPLITS)
    return f"{corpus.folder}/{{{names}}}" if corpus.folder else names.replace(",", ", ")


def _download(corpus: TextCorpus, cache: Path, fetch: bool) -> Path | None:
    """The download folder in the cache holding the split files, written from the `datasets` hub
    copy where they are not there yet (fetch False: None instead, unless the download evidently
    cannot work)."""
    missing = f"{_expected(corpus)}: no data folder is set"
    if not corpus.hub:  # read from a data folder only
        raise DataError(f"{missing}; {how_to_set(corpus.folder + '/')}")

    def texts(ds):
        return (
            (corpus.files[s], "".join(ds[corpus.hub_splits[s]][corpus.hub_column])) for s in SPLITS
        )

    target = cache / "download" / corpus.folder
    names = list(corpus.files.values())
    return target if download(target, names, corpus.hub, texts, missing, fetch) else None


def _own_folder(cfg, corpus: TextCorpus) -> Path:
    """data.root itself, for a corpus of the user's own (folder ""): it must be given."""
    if cfg.root is None:
        raise DataError(
            f"data.root: data={cfg.name} reads a folder of yours: give data.root=DIR, the folder "
            f"holding {_expected(corpus)}"
        )
    folder = expand(cfg.root)
    if not folder.is_dir():
        raise DataError(
            f"data.root: folder {cfg.root!r} does not exist; give the folder holding "
            f"{_expected(corpus)}"
        )
    return folder


def _file(folder: Path, entry, corpus: TextCorpus, how: str) -> Path:
    """The one file of `folder` that `entry` names (a DataError for none, or for two)."""
    found = [folder / name for name in _names(entry) if (folder / name).is_file()]
    if len(found) > 1:
        raise DataError(
            f"data.root: {folder} holds both {found[0].name} and {found[1].name}; keep one "
            f"({'|'.join(_names(entry))} name the same split)"
        )
    if not found:
        where = f"{folder.parent} ({how})" if corpus.folder else str(folder)
        raise DataError(
            f"data.root: missing file {folder / _names(entry)[0]}; expected {_expected(corpus)} "
            f"under {where}"
        )
    if found[0].stat().st_size == 0:
        raise DataError(f"data file {found[0]} is empty")
    check_readable(found[0])
    return found[0]


def locate(cfg, corpus: TextCorpus, cache: Path, fetch: bool = True) -> dict | None:
    """split -> the file it is read from, every file checked so a missing one is named. The folder:
    data.root itself for a corpus of the user's own; else <data folder>/<corpus.folder> (the data
    folder as root.find_root finds it), or the download folder in the cache where there is none.
    fetch False (a check before the run): nothing downloaded, None where a download would be
    tried."""
    if not corpus.folder:
        folder, how = _own_folder(cfg, corpus), "data.root"
    else:
        root = find_root(cfg.root)
        how = root.how
        if root.path is not None:
            folder = root.path / corpus.folder
        else:
            folder, how = _download(corpus, cache, fetch), "the download cache"
            if folder is None:
                return None
    return {name: _file(folder, corpus.files[name], corpus, how) for name in SPLITS}


def split_sources(files: dict, split: str) -> dict:
    """split -> where its text comes from, for error messages; `files`: split -> path."""
    if split == "moas_paper":
        return {
            "train": f"the first 90% of {files['train']}",
            "val": f"the last 10% of {files['train']}",
            "test": str(files["test"]),
        }
    return {name: str(files[name]) for name in SPLITS}


def split_texts(files: dict, split: str) -> dict:
    """split -> (where its text comes from; the text), every split holding some text."""
    sources = split_sources(files, split)
    if split == "moas_paper":
        train = read_text(files["train"])
        n = int(0.9 * len(train))
        parts = {"train": train[:n], "val": train[n:], "test": read_text(files["test"])}
    else:
        parts = {name: read_text(files[name]) for name in SPLITS}
    texts = {name: (sources[name], parts[name]) for name in SPLITS}
    for name, (source, text) in texts.items():
        if not text.strip():
            raise DataError(f"data split {name!r} is empty: {source} holds only white space")
    return texts


# --- caching --------------------------------------------------------------------------------------


def char_unk(cfg) -> bool:
    """Whether the char vocabulary gets an <unk> (data.unk; word vocabularies always hold one,
    byte-level BPE needs none)."""
    return cfg.tokenizer == "char" and bool(cfg.get("unk", False))


def _fingerprint(files: dict, cfg) -> str:
    # ":unk" only where set, so the keys of entries cached before data.unk existed stay valid
    unk = ":unk" if char_unk(cfg) else ""
    return content_key(
        [files[name] for name in SPLITS],
        f"{cfg.tokenizer}:{cfg.split}:{cfg.vocab_size}:{CACHE_VERSION}{unk}",
    )


def _note_unknown(tok, ids, name: str, source: str, text: str) -> int:
    """How many ids of a split are <unk>; where any, one log line naming a few of the characters."""
    unk_id = getattr(tok, "unk_id", None)
    n = 0 if unk_id is None or tok.kind != "char" else int((ids == unk_id).sum())
    if n:
        chars = tok.unknown(text)
        shown = ", ".join(map(repr, chars[:5])) + (" ..." if len(chars) > 5 else "")
        log.info(
            "data split %s (%s): %d characters (%d distinct: %s) are not in the train file's "
            "vocabulary; they map to %s",
            name,
            source,
            n,
            len(chars),
            shown,
            UNK,
        )
    return n


def _build(files: dict, cfg, out: Path) -> None:
    texts = split_texts(files, cfg.split)
    if cfg.tokenizer == "char":
        tok = CharTokenizer(read_text(files["train"]), unk=char_unk(cfg))
    elif cfg.tokenizer == "word":
        tok = WordTokenizer(texts["train"][1])
    else:
        tok = BPETokenizer(texts["train"][1], cfg.vocab_size, out / "tokenizer.json")
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    meta = {
        "vocab_size": tok.vocab_size,
        "tokenizer": cfg.tokenizer,
        "dtype": np.dtype(dtype).name,
        "splits": {},
    }
    for name, (source, text) in progress(texts.items(), desc="caching token ids", unit="split"):
        try:
            ids = tok.encode(text).astype(dtype)
        except DataError as exc:  # the tokenizer knows the line, the split its file
            raise DataError(f"data file {source}, {exc}") from None
        ids.tofile(out / f"{name}.bin")
        meta["splits"][name] = {
            "n_tokens": len(ids),
            "n_chars": len(text),
            "n_words": word_count(text),
            "n_unk": _note_unknown(tok, ids, name, source, text),
        }
    if tok.kind != "bpe":  # BPETokenizer saved its own file there
        (out / TOKENIZER_FILE).write_text(tokenizer_json(tok), encoding="utf-8")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _load(out: Path, sources: dict) -> TokenData:
    """The cached splits, each checked against meta.json: its length and its ids' range
    (CacheDamaged if not)."""
    meta = json.loads((out / "meta.json").read_text())
    dtype, vocab = np.dtype(meta["dtype"]), meta["vocab_size"]
    splits = {}
    for name in SPLITS:
        info, path = meta["splits"][name], out / f"{name}.bin"
        if info["n_tokens"] <= 0 or path.stat().st_size != info["n_tokens"] * dtype.itemsize:
            raise CacheDamaged(
                f"{path.name} holds {path.stat().st_size} bytes, meta.json says {info['n_tokens']} "
                f"ids of {dtype.itemsize} bytes"
            )
        tokens = np.memmap(path, dtype=dtype, mode="r")
        check_ids(path, tokens, info["n_tokens"], vocab)
        splits[name] = Split(tokens, info["n_chars"], info["n_words"], sources[name])
    # an entry written before tokenizers were kept for the run folder
    if not (out / TOKENIZER_FILE).is_file():
        raise CacheDamaged(
            f"{TOKENIZER_FILE} is missing (a cache entry older than saved tokenizers)"
        )
    return TokenData(splits, vocab, meta["tokenizer"], out / TOKENIZER_FILE)


def check_text_files(cfg, corpus: TextCorpus) -> None:
    """DataError (the one line the run would end with) where the corpus' files cannot be had:
    missing under the data folder, or neither there nor downloadable (offline). Nothing is read
    or downloaded: a check before the run."""
    locate(cfg, corpus, expand(cfg.cache_dir), fetch=False)


def load_text_corpus(cfg, corpus: TextCorpus) -> TokenData:
    """`corpus` tokenized by data.tokenizer and split by data.split."""
    cache = expand(cfg.cache_dir)
    files = locate(cfg, corpus, cache)
    out = cache / corpus.cache / _fingerprint(files, cfg)
    sources = split_sources(files, cfg.split)
    return load_cached(
        out, lambda tmp: _build(files, cfg, tmp), lambda entry: _load(entry, sources)
    )
