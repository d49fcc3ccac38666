"""WikiText-2 as token streams (char, word or BPE), cached as memmaps.

Files: `<root>/wikitext-2/{train,valid,test}.txt` (the tokenized v1 release). Where `data.root` is null the files are
downloaded once through `datasets` into the cache; offline, a clear error names MOA_DATA_DIR.

Splits: `official` uses the valid/test files; `moas_paper` reproduces the MoAS paper's split (first 90% of the
train file's characters for training, the last 10% as "validation"; test stays the official test file). The split
is made on the text, so char, word and BPE runs see the same underlying characters.

Each split records how many characters and words its text holds, so a loss in nats per token converts to bits per
character (`val/bpc`) and word-level perplexity (`val/word_ppl`) whatever the tokenizer.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moa_train.data.cache import CacheDamaged, check_ids, content_key, load_cached
from moa_train.io import atomic_write_text
from moa_train.progress import progress

SPLIT_FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
CACHE_VERSION = 1


class DataError(ValueError):
    """A user-fixable data problem: printed as one line by the entry point."""


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


def check_lengths(data: TokenData, block_size: int) -> None:
    """Every split must hold a window of block_size tokens and its next-token targets. Checked before the first
    step: a short valid/test split otherwise surfaces at the first evaluation, after training steps and before any
    checkpoint."""
    for name, split in data.splits.items():
        n = len(split.tokens)
        if n < block_size + 2:
            raise DataError(f"data file {split.source or name}: the {name} split holds {n} tokens, too few for "
                            f"trainer.block_size={block_size} (needs block_size + 2); valid here: "
                            f"1..{max(n - 2, 0)}, or a longer file")


def word_count(text: str) -> int:
    return len(text.split()) + text.count("\n")


# --- locating the text ------------------------------------------------------------------------------------------

def _download(cache: Path) -> Path:
    """Write the three files from the `datasets` hub copy into the cache; only where the network exists."""
    target = cache / "download" / "wikitext-2"
    if all((target / f).is_file() for f in SPLIT_FILES.values()):
        return target.parent
    try:
        import datasets

        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-v1")
    except Exception as exc:  # offline, hub down, package missing: all end in the same advice
        raise DataError(
            "WikiText-2 not found: set MOA_DATA_DIR (or data.root) to a folder holding "
            f"wikitext-2/{{train,valid,test}}.txt; downloading through `datasets` failed ({type(exc).__name__})"
        ) from None
    target.mkdir(parents=True, exist_ok=True)
    for split, fname in (("train", "train.txt"), ("validation", "valid.txt"), ("test", "test.txt")):
        atomic_write_text(target / fname, "".join(ds[split]["text"]))
    return target.parent


def locate(root, cache: Path) -> Path:
    """The folder holding wikitext-2/; every file checked so a missing one is named."""
    base = _download(cache) if root is None else Path(os.path.expanduser(str(root)))
    folder = base / "wikitext-2"
    for fname in SPLIT_FILES.values():
        path = folder / fname
        if not path.is_file():
            raise DataError(f"data.root: missing file {path}; expected wikitext-2/{{train,valid,test}}.txt under "
                            f"{base} (set MOA_DATA_DIR or data.root)")
        if path.stat().st_size == 0:
            raise DataError(f"data file {path} is empty")
    return folder


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"data file {path} is not UTF-8 text (line {line})") from None


def split_sources(folder: Path, split: str) -> dict:
    """split -> where its text comes from, for error messages."""
    if split == "moas_paper":
        train = folder / SPLIT_FILES["train"]
        return {"train": f"the first 90% of {train}", "val": f"the last 10% of {train}",
                "test": str(folder / SPLIT_FILES["test"])}
    return {name: str(folder / fname) for name, fname in SPLIT_FILES.items()}


def split_texts(folder: Path, split: str) -> dict:
    """split -> (where its text comes from; the text), every split holding some text."""
    sources = split_sources(folder, split)
    if split == "moas_paper":
        train = read_text(folder / SPLIT_FILES["train"])
        n = int(0.9 * len(train))
        parts = {"train": train[:n], "val": train[n:], "test": read_text(folder / SPLIT_FILES["test"])}
    else:
        parts = {name: read_text(folder / fname) for name, fname in SPLIT_FILES.items()}
    texts = {name: (sources[name], parts[name]) for name in SPLIT_FILES}
    for name, (source, text) in texts.items():
        if not text.strip():
            raise DataError(f"data split {name!r} is empty: {source} holds only white space")
    return texts


# --- tokenizers ---------------------------------------------------------------------------------------------------

class CharTokenizer:
    """Vocabulary = sorted characters of the whole train FILE (283 for WikiText-2, as in the MoAS paper)."""

    def __init__(self, vocab_text: str):
        self.codepoints = np.array(sorted({ord(c) for c in vocab_text}), dtype=np.uint32)

    def encode(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self.codepoints, cps).clip(max=len(self.codepoints) - 1)
        bad = np.flatnonzero(self.codepoints[ids] != cps)
        if len(bad):
            line = text.count("\n", 0, int(bad[0])) + 1
            raise DataError(f"line {line}: character {chr(cps[bad[0]])!r} is not in the train file's vocabulary")
        return ids

    @property
    def vocab_size(self) -> int:
        return len(self.codepoints)


class WordTokenizer:
    """Whitespace words plus <eos> at each line end; vocabulary from the train split (WikiText has no OOV)."""

    def __init__(self, vocab_text: str):
        words = sorted(set(vocab_text.split()) | {"<eos>", "<unk>"})
        self.stoi = {w: i for i, w in enumerate(words)}

    def encode(self, text: str) -> np.ndarray:
        unk, ids = self.stoi["<unk>"], []
        for line in text.splitlines(keepends=True):
            ids.extend(self.stoi.get(w, unk) for w in line.split())
            if line.endswith("\n"):
                ids.append(self.stoi["<eos>"])
        return np.asarray(ids, dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return len(self.stoi)


class BPETokenizer:
    """Byte-level BPE trained with `tokenizers` on the train split; saved beside the cached ids."""

    def __init__(self, train_text: str, vocab_size: int, path: Path):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if path.is_file():
            self.tok = Tokenizer.from_file(str(path))
            return
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=sys.stderr.isatty())
        tok.train_from_iterator(train_text.splitlines(keepends=True), trainer=trainer)
        tok.save(str(path))
        self.tok = tok

    def encode(self, text: str) -> np.ndarray:
        lines = text.splitlines(keepends=True)
        return np.asarray([i for enc in self.tok.encode_batch(lines) for i in enc.ids], dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()


# --- caching ------------------------------------------------------------------------------------------------------

def _fingerprint(folder: Path, cfg) -> str:
    return content_key([folder / fname for fname in SPLIT_FILES.values()],
                       f"{cfg.tokenizer}:{cfg.split}:{cfg.vocab_size}:{CACHE_VERSION}")


def _build(folder: Path, cfg, out: Path) -> None:
    texts = split_texts(folder, cfg.split)
    if cfg.tokenizer == "char":
        tok = CharTokenizer(read_text(folder / SPLIT_FILES["train"]))
    elif cfg.tokenizer == "word":
        tok = WordTokenizer(texts["train"][1])
    else:
        tok = BPETokenizer(texts["train"][1], cfg.vocab_size, out / "tokenizer.json")
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    meta = {"vocab_size": tok.vocab_size, "tokenizer": cfg.tokenizer, "dtype": np.dtype(dtype).name, "splits": {}}
    for name, (source, text) in progress(texts.items(), desc="caching token ids", unit="split"):
        try:
            ids = tok.encode(text).astype(dtype)
        except DataError as exc:  # the tokenizer knows the line, the split its file
            raise DataError(f"data file {source}, {exc}") from None
        ids.tofile(out / f"{name}.bin")
        meta["splits"][name] = {"n_tokens": len(ids), "n_chars": len(text), "n_words": word_count(text)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _load(out: Path, sources: dict) -> TokenData:
    """The cached splits, each checked against meta.json: its length and its ids' range (CacheDamaged if not)."""
    meta = json.loads((out / "meta.json").read_text())
    dtype, vocab = np.dtype(meta["dtype"]), meta["vocab_size"]
    splits = {}
    for name in SPLIT_FILES:
        info, path = meta["splits"][name], out / f"{name}.bin"
        if info["n_tokens"] <= 0 or path.stat().st_size != info["n_tokens"] * dtype.itemsize:
            raise CacheDamaged(f"{path.name} holds {path.stat().st_size} bytes, meta.json says {info['n_tokens']} "
                               f"ids of {dtype.itemsize} bytes")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        check_ids(path, tokens, info["n_tokens"], vocab)
        splits[name] = Split(tokens, info["n_chars"], info["n_words"], sources[name])
    return TokenData(splits, vocab, meta["tokenizer"])


def load_wikitext2(cfg) -> TokenData:
    cache = Path(os.path.expanduser(str(cfg.cache_dir)))
    folder = locate(cfg.root, cache)
    out = cache / "wikitext2" / _fingerprint(folder, cfg)
    sources = split_sources(folder, cfg.split)
    return load_cached(out, lambda tmp: _build(folder, cfg, tmp), lambda entry: _load(entry, sources))
