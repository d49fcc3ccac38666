"""The LM tokenizers: char, word and byte-level BPE, each with `encode`, `decode`, `unknown` and
`vocab_size`; their JSON (`tokenizer.json`, kept in a cache entry and copied into a run folder, so
the folder alone can be evaluated and generated from) and the identity a checkpoint records of
it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from moa_train.data.corpus import DataError, train_bpe

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
