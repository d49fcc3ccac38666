"""WikiText-2 loading: tokenizers, splits, word/char counts, bpc conversion and the cache."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REAL_DATA, write_wikitext
from moa_train.data import DataError, load_corpus, wikitext
from moa_train.data.batches import RandomWindows, sequential_windows, windows
from moa_train.data.wikitext import CharTokenizer, Split, read_text, word_count
from moa_train.train.evaluate import split_metrics


@pytest.fixture
def data_cfg(make_cfg, tmp_path):
    """data_cfg(*overrides): the data section, with a cache folder of this test's own."""

    def _cfg(*overrides):
        return make_cfg(f"data.cache_dir={tmp_path / 'cache'}", *overrides).data

    return _cfg


@pytest.fixture(scope="module")
def char_data(make_cfg):
    return load_corpus(make_cfg("data=wikitext2_char").data)


def test_char_vocabulary_is_sorted_train_characters(char_data, wikitext_texts):
    chars = sorted(set(wikitext_texts["train"]))
    assert char_data.vocab_size == len(chars)
    assert char_data.tokenizer == "char"
    tok = CharTokenizer(wikitext_texts["train"])
    assert [chr(c) for c in tok.codepoints] == chars


@pytest.mark.parametrize("split,fname", [("train", "train"), ("val", "valid"), ("test", "test")])
def test_char_ids_round_trip(char_data, wikitext_texts, split, fname):
    chars = sorted(set(wikitext_texts["train"]))
    s = char_data.splits[split]
    text = "".join(chars[i] for i in np.asarray(s.tokens))
    assert text == wikitext_texts[fname]
    assert s.n_chars == len(text) == len(s.tokens)
    assert s.n_words == len(text.split()) + text.count("\n")


def test_char_tokenizer_refuses_unknown_characters():
    with pytest.raises(DataError, match="'z'"):
        CharTokenizer("abc").encode("abz")


def test_moas_paper_split(make_cfg, wikitext_texts):
    data = load_corpus(make_cfg("data=wikitext2_char", "data.split=moas_paper").data)
    train = wikitext_texts["train"]
    n = int(0.9 * len(train))
    chars = sorted(set(train))
    text = {
        k: "".join(chars[i] for i in np.asarray(data.splits[k].tokens))
        for k in ("train", "val", "test")
    }
    assert len(data.splits["train"].tokens) == data.splits["train"].n_chars == n
    assert len(data.splits["val"].tokens) == data.splits["val"].n_chars == len(train) - n
    assert text["train"] == train[:n] and text["val"] == train[n:]
    assert text["test"] == wikitext_texts["test"]  # test stays the official file


def test_word_tokenizer_counts(make_cfg, wikitext_texts):
    data = load_corpus(make_cfg("data=wikitext2_word").data)
    train_words = set(wikitext_texts["train"].split())
    assert data.vocab_size == len(train_words | {"<eos>", "<unk>"})
    for split, fname in (("train", "train"), ("val", "valid"), ("test", "test")):
        text, s = wikitext_texts[fname], data.splits[split]
        n_lines = text.count("\n")
        assert s.n_words == len(text.split()) + n_lines
        assert len(s.tokens) == s.n_words  # one id per word plus one <eos> per line
    tok = wikitext.WordTokenizer(wikitext_texts["train"])
    ids = tok.encode(wikitext_texts["valid"])
    assert int((ids == tok.stoi["<eos>"]).sum()) == wikitext_texts["valid"].count("\n")


def test_word_count():
    assert word_count(" = Title = \n a b , c . \n \n") == 8 + 3  # 8 words, 3 line ends
    assert word_count("no newline") == 2


def test_split_metrics_conversions():
    split = Split(tokens=np.zeros(1000, dtype=np.uint16), n_chars=3500, n_words=250)
    loss = 1.3
    m = split_metrics("val", loss, split)
    assert set(m) == {"val/loss", "val/ppl", "val/bpc", "val/word_ppl"}
    assert m["val/loss"] == loss
    assert m["val/ppl"] == pytest.approx(math.exp(loss))
    assert m["val/bpc"] == pytest.approx(loss / math.log(2) / 3.5)
    assert m["val/word_ppl"] == pytest.approx(math.exp(loss / 0.25))


def test_cache_is_reused(data_cfg, monkeypatch):
    cfg = data_cfg("data=wikitext2_char")
    first = load_corpus(cfg)
    cache = cache_root(cfg)
    metas = list(cache.glob("*/meta.json"))
    assert len(metas) == 1
    meta = json.loads(metas[0].read_text())
    assert meta["vocab_size"] == first.vocab_size and meta["tokenizer"] == "char"

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt instead of reused")

    monkeypatch.setattr(wikitext, "_build", no_rebuild)
    second = load_corpus(cfg)
    for name in ("train", "val", "test"):
        assert np.array_equal(
            np.asarray(first.splits[name].tokens), np.asarray(second.splits[name].tokens)
        )
        assert first.splits[name].n_chars == second.splits[name].n_chars
    assert not list(cache.glob("*.tmp*"))  # no partial folders left behind


def cache_root(cfg) -> Path:
    return Path(str(cfg.cache_dir)) / "wikitext2"


def test_cache_keys_on_tokenizer_and_split(data_cfg):
    load_corpus(data_cfg("data=wikitext2_char"))
    load_corpus(data_cfg("data=wikitext2_char", "data.split=moas_paper"))
    cfg = data_cfg("data=wikitext2_word")
    load_corpus(cfg)
    assert len(list(cache_root(cfg).glob("*/meta.json"))) == 3


def test_bpe_trains_and_encodes(data_cfg, wikitext_texts):
    from tokenizers import Tokenizer

    cfg = data_cfg("data=wikitext2_bpe", "data.vocab_size=300")
    data = load_corpus(cfg)
    assert data.tokenizer == "bpe"
    assert 256 < data.vocab_size <= 300
    [tok_file] = cache_root(cfg).glob("*/tokenizer.json")
    tok = Tokenizer.from_file(str(tok_file))
    for split, fname in (("train", "train"), ("val", "valid")):
        ids = np.asarray(data.splits[split].tokens)
        assert ids.max() < data.vocab_size
        assert len(ids) < len(wikitext_texts[fname])  # merges make tokens longer than a byte
        assert tok.decode(ids.tolist()) == wikitext_texts[fname]
        assert data.splits[split].n_chars == len(wikitext_texts[fname])


def test_missing_file_is_named(tmp_path, data_cfg):
    write_wikitext(tmp_path / "partial", splits=("train", "test"))
    with pytest.raises(DataError, match=re.escape("valid.txt")):
        load_corpus(data_cfg(f"data.root={tmp_path / 'partial'}"))


def test_windows_shift_targets_by_one():
    tokens = np.arange(100)
    x, y = windows(tokens, np.array([0, 10, 50]), 8)
    assert x.shape == y.shape == (3, 8)
    assert (x[:, 0] == [0, 10, 50]).all() and (y == x + 1).all()


@pytest.mark.parametrize("n", [65, 66, 70])
def test_sequential_windows_cover_every_target_once(n):
    tokens = np.arange(n)
    batches = list(
        sequential_windows(tokens, batch_size=3, block_size=8, device=torch.device("cpu"))
    )
    targets = np.concatenate([y.flatten().numpy() for _, y in batches])
    assert targets.tolist() == list(range(1, n))
    for x, y in batches:
        assert torch.equal(y, x + 1)


def test_random_windows_are_seeded_and_resumable():
    tokens = np.arange(1000)
    a = RandomWindows(tokens, 4, 16, seed=0, device=torch.device("cpu"))
    b = RandomWindows(tokens, 4, 16, seed=0, device=torch.device("cpu"))
    a.next()
    state = a.state_dict()
    expected = a.next()
    b.load_state_dict(state)
    got = b.next()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(got[1], got[0] + 1) and int(got[1].max()) < 1000


@pytest.mark.skipif(
    not (REAL_DATA / "wikitext-2" / "train.txt").is_file(), reason="../shared/data absent"
)
def test_real_wikitext2_counts():
    folder = REAL_DATA / "wikitext-2"
    assert CharTokenizer(read_text(folder / "train.txt")).vocab_size == 283
    assert word_count(read_text(folder / "valid.txt")) == 217_646


# --- the cache: keyed by content, checked when read -----------------------------------------------


def test_cache_keys_on_content_not_size_and_time(data_root, tmp_path, make_cfg):
    """A folder whose files have the same sizes and times but other text gets its own tokens, not
    the cached ones."""
    import os
    import shutil

    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(data_root, first)
    shutil.copytree(data_root, second)
    valid = second / "wikitext-2" / "valid.txt"
    stat = valid.stat()
    text = valid.read_text(encoding="utf-8")
    # same size, other order
    valid.write_text(text[len(text) // 2 :] + text[: len(text) // 2], encoding="utf-8")
    os.utime(valid, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.utime(first / "wikitext-2" / "valid.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    a = load_corpus(make_cfg(f"data.root={first}", cache).data)
    b = load_corpus(make_cfg(f"data.root={second}", cache).data)
    train_text = (second / "wikitext-2" / "train.txt").read_text(encoding="utf-8")
    expected = CharTokenizer(train_text).encode(valid.read_text(encoding="utf-8"))
    assert not np.array_equal(
        np.asarray(a.splits["val"].tokens), np.asarray(b.splits["val"].tokens)
    )
    assert np.array_equal(np.asarray(b.splits["val"].tokens), expected)


def _truncate(path: Path, n: int = 1) -> None:
    path.write_bytes(path.read_bytes()[:-n])


def _id_beyond_vocab(entry: Path) -> None:
    ids = np.fromfile(entry / "train.bin", dtype=np.uint16)
    ids[5] = 60000
    ids.tofile(entry / "train.bin")


CACHE_DAMAGE = {
    "odd-sized bin": (lambda e: _truncate(e / "train.bin"), "train.bin holds"),
    "truncated bin": (lambda e: _truncate(e / "val.bin", 200), "val.bin holds"),
    "empty bin": (lambda e: (e / "test.bin").write_bytes(b""), "test.bin holds 0 bytes"),
    "missing val.bin": (lambda e: (e / "val.bin").unlink(), "val.bin"),
    "truncated meta.json": (lambda e: _truncate(e / "meta.json", 30), "Expecting"),
    "ids beyond the vocabulary": (_id_beyond_vocab, "beyond the vocabulary"),
}


@pytest.mark.parametrize("case", list(CACHE_DAMAGE))
def test_damaged_cache_is_rebuilt_with_one_warning(data_cfg, caplog, case):
    damage, words = CACHE_DAMAGE[case]
    cfg = data_cfg("data=wikitext2_char")
    good = {k: np.array(v.tokens) for k, v in load_corpus(cfg).splits.items()}
    [entry] = list(cache_root(cfg).iterdir())
    damage(entry)
    with caplog.at_level("WARNING"):
        again = load_corpus(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "is damaged" in warnings[0] and words in warnings[0], warnings
    for name, tokens in good.items():
        assert np.array_equal(np.asarray(again.splits[name].tokens), tokens)
    # rebuilt in place, nothing left aside
    assert [p.name for p in cache_root(cfg).iterdir()] == [entry.name]
