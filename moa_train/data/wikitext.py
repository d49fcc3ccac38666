"""LM corpora (WikiText-2, a text folder of the user's own, and any added to `LM_CORPORA`) as token
streams (char, word or BPE), cached as memmaps.

Files: one plain-text file per split, `<data folder>/<folder>/{train,valid,test}.txt` for
WikiText-2 (the tokenized v1 release), the data folder as data/root.py finds it (data.root,
MOA_DATA_DIR, the recorded one, ../shared/data); with none, the files are downloaded once through
`datasets` into the cache, where the network is evidently there (otherwise a one-line error says
how to set the data folder). `data=text` reads `data.root` itself: train.txt, valid.txt (or
validation.txt, val.txt) and test.txt. A new corpus is one `LM_CORPORA` entry (keyed by its
`data.name`) and one `configs/data/<name>.yaml`; from outside the package, through a plugin
(moa_train/plugins.py).

Splits: `official` uses the valid/test files; `moas_paper` reproduces the MoAS paper's split (first
90% of the train file's characters for training, the last 10% as "validation"; test stays the
official test file). The split is made on the text, so char, word and BPE runs see the same
underlying characters.

Each split records how many characters and words its text holds, so a loss in nats per token
converts to bits per character (`val/bpc`) and word-level perplexity (`val/word_ppl`) whatever the
tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moa_train.data.cache import CacheDamaged, check_ids, content_key, load_cached
from moa_train.data.corpus import DataError, check_readable, expand, read_text, train_bpe
from moa_train.data.root import download, find_root, how_to_set
from moa_train.progress import progress

log = logging.getLogger(__name__)

CACHE_VERSION = 1


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
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    tokens: np.ndarray  # 1-D memmap of token ids
    n_chars: int  # characters of the underlying text
    n_words: int  # whitespace words + one <eos> per line (the WikiText word count)
    source: str = ""  # where the text comes from (a file, or a part of one), for error messages

    @property
    def chars_per_token(self) -> float:
        return self.n_chars / max(len(self.tokens), 1)

    @property
    def words_per_token(self) -> float:
        return self.n_words / max(len(self.tokens), 1)


@dataclass
class TokenData:
    splits: dict  # "train" | "val" | "test" -> Split
    vocab_size: int
    tokenizer: str
    # tokenizer_json's file, which a run copies into its folder; None: no text
    tokenizer_file: Path | None = None


def check_lengths(data: TokenData, block_size: int) -> None:
    """Every split must hold a window of block_size tokens and its next-token targets. Checked
    before the first step: a short valid/test split otherwise surfaces at the first evaluation,
    after training steps and before any checkpoint."""
    for name, split in data.splits.items():
        n = len(split.tokens)
        if n < block_size + 2:
            raise DataError(
                f"data file {split.source or name}: the {name} split holds {n} tokens, too few for "
                f"trainer.block_size={block_size} (needs block_size + 2); valid here: "
                f"1..{max(n - 2, 0)}, or a longer file"
            )


def word_count(text: str) -> int:
    return len(text.split()) + text.count("\n")


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


# --- tokenizers -----------------------------------------------------------------------------------


UNK = "<unk>"  # the unknown symbol of a word vocabulary, and of a char vocabulary with data.unk


class CharTokenizer:
    """Vocabulary = sorted characters of the whole train FILE (283 for WikiText-2, as in the MoAS
    paper); with `unk` one more id, last, for every character outside them (data.unk=true),
    otherwise such a character is refused. <unk> stands for one character of the text, so bits per
    character stay per character (the unseen character's identity is not coded)."""

    kind = "char"

    def __init__(self, vocab_text: str, unk: bool = False):
        self.codepoints = np.array(sorted({ord(c) for c in vocab_text}), dtype=np.uint32)
        self.unk_id = len(self.codepoints) if unk else None

    @property
    def symbols(self) -> list:
        """The vocabulary in id order."""
        return [chr(c) for c in self.codepoints] + ([UNK] if self.unk_id is not None else [])

    def unknown(self, text: str) -> list:
        """The characters of `text` outside the vocabulary, each once, in order of appearance."""
        known = set(self.symbols)
        return list(dict.fromkeys(c for c in text if c not in known))

    def decode(self, ids) -> str:
        return "".join(UNK if i == self.unk_id else chr(self.codepoints[i]) for i in ids)

    def encode(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self.codepoints, cps).clip(max=len(self.codepoints) - 1)
        bad = np.flatnonzero(self.codepoints[ids] != cps)
        if len(bad) and self.unk_id is None:
            line = text.count("\n", 0, int(bad[0])) + 1
            raise DataError(
                f"line {line}: character {chr(cps[bad[0]])!r} is not in the train file's "
                f"vocabulary (data.unk=true maps such characters to {UNK})"
            )
        if len(bad):
            ids[bad] = self.unk_id
        return ids

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)


class WordTokenizer:
    """Whitespace words plus <eos> at each line end; vocabulary from the train split (WikiText has
    no OOV). Unknown words map to <unk>, which the vocabulary always holds. decode writes each word
    as " word" and <eos> as " \\n", WikiText's own layout, so a WikiText line round-trips
    exactly."""

    kind = "word"

    def __init__(self, vocab_text: str = "", symbols: list | None = None):
        words = symbols if symbols is not None else sorted(set(vocab_text.split()) | {"<eos>", UNK})
        self.stoi = {w: i for i, w in enumerate(words)}
        self.itos = list(words)
        self.unk_id = self.stoi.get(UNK)

    @property
    def symbols(self) -> list:
        return self.itos

    def unknown(self, text: str) -> list:
        return list(dict.fromkeys(w for w in text.split() if w not in self.stoi))

    def decode(self, ids) -> str:
        return "".join(" \n" if self.itos[i] == "<eos>" else " " + self.itos[i] for i in ids)

    def encode(self, text: str) -> np.ndarray:
        unk, ids = self.stoi[UNK], []
        for line in text.splitlines(keepends=True):
            ids.extend(self.stoi.get(w, unk) for w in line.split())
            if line.endswith("\n"):
                ids.append(self.stoi["<eos>"])
        return np.asarray(ids, dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return len(self.stoi)


class BPETokenizer:
    """Byte-level BPE trained with `tokenizers` on the train split; saved beside the cached ids
    (tokenizers' JSON)."""

    kind = "bpe"

    def __init__(self, train_text: str, vocab_size: int, path: Path):
        from tokenizers import Tokenizer

        if path.is_file():
            self.tok = Tokenizer.from_file(str(path))
            return
        self.tok = train_bpe(train_text.splitlines(keepends=True), vocab_size, path)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        self = cls.__new__(cls)
        self.tok = Tokenizer.from_str(text)
        return self

    def unknown(self, text: str) -> list:
        return []  # byte-level: every string has ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def encode(self, text: str) -> np.ndarray:
        lines = text.splitlines(keepends=True)
        return np.asarray(
            [i for enc in self.tok.encode_batch(lines) for i in enc.ids], dtype=np.int64
        )

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()


TOKENIZER_FILE = "tokenizer.json"  # in a cache entry and in a run folder


def tokenizer_json(tok) -> str:
    """A char or word vocabulary as JSON (the kind and the symbols in id order); BPE: tokenizers'
    own JSON."""
    if tok.kind == "bpe":
        return tok.tok.to_str()
    return json.dumps({"kind": tok.kind, "symbols": tok.symbols}, ensure_ascii=False)


def tokenizer_from_json(text: str, source: str = TOKENIZER_FILE):
    """The tokenizer `tokenizer_json` wrote; plain JSON only, nothing in it runs. DataError (one
    line naming `source`) for text that is not such a file."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source} is not valid JSON ({exc})") from None
    if isinstance(spec, dict) and "model" in spec:  # tokenizers' format
        try:
            return BPETokenizer.from_json(text)
        except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot read
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{source} is not a tokenizers BPE file ({first})") from None
    kind = spec.get("kind") if isinstance(spec, dict) else None
    symbols = spec.get("symbols") if isinstance(spec, dict) else None
    if kind in ("char", "word") and not (
        isinstance(symbols, list) and all(isinstance(s, str) for s in symbols)
    ):
        raise DataError(f"{source}: a {kind} vocabulary needs 'symbols', a list of strings")
    if kind == "char":
        unk = bool(symbols) and symbols[-1] == UNK
        chars = symbols[:-1] if unk else symbols
        if not all(len(c) == 1 for c in chars):
            raise DataError(
                f"{source}: a char vocabulary's symbols are single characters (and {UNK} last)"
            )
        return CharTokenizer("".join(chars), unk=unk)
    if kind == "word":
        return WordTokenizer(symbols=symbols)
    raise DataError(
        f"{source}: not a moa_train tokenizer (kind {kind!r}; expected char, word or tokenizers' "
        "BPE)"
    )


def tokenizer_identity(raw: bytes, vocab_size: int) -> dict:
    """What a checkpoint records of the tokenizer its weights were trained with, and what
    moa-generate compares a run folder's tokenizer.json with: the sha256 of the file's bytes and
    the vocabulary size."""
    return {"sha256": hashlib.sha256(raw).hexdigest(), "vocab_size": int(vocab_size)}


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


def _corpus(cfg) -> TextCorpus:
    if cfg.name not in LM_CORPORA:
        raise DataError(
            f"data.name: {cfg.name!r} is not an LM corpus; allowed: {', '.join(LM_CORPORA)}"
        )
    return LM_CORPORA[cfg.name]


def check_files(cfg) -> None:
    """DataError (the one line the run would end with) where the corpus' files cannot be had:
    missing under the data folder, or neither there nor downloadable (offline). Nothing is read
    or downloaded: a check before the run."""
    locate(cfg, _corpus(cfg), expand(cfg.cache_dir), fetch=False)


def load_corpus(cfg) -> TokenData:
    """The LM corpus `LM_CORPORA[data.name]`, tokenized by data.tokenizer and split by
    data.split."""
    corpus, cache = _corpus(cfg), expand(cfg.cache_dir)
    files = locate(cfg, corpus, cache)
    out = cache / corpus.cache / _fingerprint(files, cfg)
    sources = split_sources(files, cfg.split)
    return load_cached(
        out, lambda tmp: _build(files, cfg, tmp), lambda entry: _load(entry, sources)
    )
