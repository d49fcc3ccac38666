"""WikiText-2 loading: tokenizers, splits, word/char counts, bpc conversion and the cache."""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REAL_DATA, write_wikitext
from moa_train.data import DataError, load_corpus, text_corpus
from moa_train.data.batches import RandomWindows, sequential_windows, windows
from moa_train.data.corpus import read_text
from moa_train.data.tokenizer import (
    CharTokenizer,
    WordTokenizer,
    tokenizer_from_json,
    tokenizer_json,
)
from moa_train.data.tokens import Split, word_count
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
    tok = WordTokenizer(wikitext_texts["train"])
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

    monkeypatch.setattr(text_corpus, "_build", no_rebuild)
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


# --- where the data folder is: data.root / MOA_DATA_DIR, the recorded one, ../shared/data --------


@pytest.fixture
def no_data_dir(monkeypatch, tmp_path):
    """No data folder set or recorded, and ../shared/data searched under tmp_path/checkout (absent):
    where `datasets` is called, the call is recorded (it returns nothing usable)."""
    from moa_train.data import root

    monkeypatch.delenv("MOA_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr(root, "SEARCHED", (str(tmp_path / "checkout" / "shared"),))
    calls = []

    def load_dataset(*args):
        calls.append(args)
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def _lm_cfg(tmp_path, root=None, **keys):
    from omegaconf import OmegaConf

    base = {"name": "wikitext2_char", "task": "lm", "tokenizer": "char", "split": "official"}
    return OmegaConf.create(
        {**base, "root": root, "cache_dir": str(tmp_path / "cache"), "vocab_size": None, **keys}
    )


def test_the_data_folder_is_data_root_then_the_recorded_one_then_the_searched_one(
    no_data_dir, tmp_path, data_root
):
    from moa_train.data import resolve_root, root
    from moa_train.data.__main__ import main

    assert resolve_root(_lm_cfg(tmp_path)) is None  # nothing: download
    searched = tmp_path / "checkout" / "shared"
    searched.mkdir(parents=True)
    assert resolve_root(_lm_cfg(tmp_path)) == searched.resolve()
    main(["--set-root", str(data_root)])
    assert root.record_file().read_text(encoding="utf-8").strip() == str(data_root.resolve())
    assert resolve_root(_lm_cfg(tmp_path)) == data_root.resolve()
    # the recorded folder alone (no MOA_DATA_DIR, no data.root) is read from
    assert load_corpus(_lm_cfg(tmp_path)).splits["val"].source.startswith(str(data_root.resolve()))
    assert resolve_root(_lm_cfg(tmp_path, root=str(tmp_path))) == tmp_path  # data.root first
    main(["--forget"])
    assert resolve_root(_lm_cfg(tmp_path)) == searched.resolve()
    assert not no_data_dir


def test_a_recorded_data_folder_that_is_gone_is_one_error(no_data_dir, tmp_path, capsys):
    from moa_train.data import check_files, root
    from moa_train.data.__main__ import main

    gone = tmp_path / "gone"
    gone.mkdir()
    main(["--set-root", str(gone)])
    gone.rmdir()
    with pytest.raises(DataError, match=r"data_dir: the recorded data folder .*gone.* does not"):
        check_files(_lm_cfg(tmp_path))
    root.record_file().write_text("\n", encoding="utf-8")  # not the working directory
    with pytest.raises(DataError, match="the recorded data folder '' does not exist"):
        check_files(_lm_cfg(tmp_path))
    with pytest.raises(SystemExit) as exc:
        main(["--set-root", str(gone)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set-root:") and "\n" not in err


def test_offline_evident_tries_no_download_and_says_how_to_set_the_folder(
    no_data_dir, tmp_path, monkeypatch
):
    from moa_train.data import check_files

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for call in (check_files, load_corpus):
        with pytest.raises(DataError) as exc:
            call(_lm_cfg(tmp_path))
        message = str(exc.value)
        assert "\n" not in message
        for words in (
            "wikitext-2/{train.txt,valid.txt,test.txt}: no data folder is set",
            "no download was tried (HF_DATASETS_OFFLINE is set)",
            "MOA_DATA_DIR",
            "python3 -m moa_train.data --set-root DIR",
        ):
            assert words in message, message
    assert not no_data_dir  # datasets was never asked
    assert not (tmp_path / "cache" / "download").exists()


def test_an_unreachable_hub_is_offline_within_a_second(monkeypatch):
    """The probe asks the hub's host (HF_ENDPOINT) for a TCP connection: a closed port is offline,
    a listening one is not."""
    import socket
    import time

    from moa_train.data.root import offline_reason

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert offline_reason() is None
    start = time.monotonic()
    assert offline_reason() == "127.0.0.1 cannot be reached"  # the port is closed now
    assert time.monotonic() - start < 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline_reason() == "HF_HUB_OFFLINE is set"


def test_the_check_before_a_run_downloads_nothing(no_data_dir, tmp_path, monkeypatch, data_root):
    from moa_train.data import check_files

    monkeypatch.setattr("moa_train.data.root.offline_reason", lambda: None)
    check_files(_lm_cfg(tmp_path))  # online: the run's own load will download
    check_files(_lm_cfg(tmp_path, name="random_tokens", tokenizer="random"))
    assert not no_data_dir
    write_wikitext(tmp_path / "partial", splits=("train", "test"))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "partial" / "wikitext-2"))):
        check_files(_lm_cfg(tmp_path, root=str(tmp_path / "partial")))
    check_files(_lm_cfg(tmp_path, root=str(data_root)))
    # a translation corpus: its own files
    monkeypatch.setattr("moa_train.data.root.offline_reason", lambda: "offline here")
    with pytest.raises(DataError, match=r"multi30k/\{train,val,test_2016_flickr\}.*offline here"):
        check_files(_lm_cfg(tmp_path, name="multi30k_en_de", tasks=["translation"]))


def test_a_failed_download_prints_each_hub_warning_once(no_data_dir, tmp_path, monkeypatch):
    """`huggingface_hub` logs its retries through a handler of its own and the root logger's (a
    run's console): only the root's is left during the download."""
    import logging

    monkeypatch.setattr("moa_train.data.root.offline_reason", lambda: None)
    seen = {"root": [], "hub": []}

    class Record(logging.Handler):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def emit(self, record):
            seen[self.key].append(record.getMessage())

    def load_dataset(*args):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hub, root = logging.getLogger("huggingface_hub"), logging.getLogger()
    monkeypatch.setattr(hub, "handlers", [Record("hub")])
    monkeypatch.setattr(root, "handlers", [*root.handlers, Record("root")])
    with pytest.raises(DataError, match="downloading it through `datasets` failed"):
        load_corpus(_lm_cfg(tmp_path))
    assert seen == {"root": ["Retrying in 1s [Retry 1/5]."], "hub": []}
    assert [type(h).__name__ for h in hub.handlers] == ["Record"]  # given back


# --- data=text: a folder of your own; char vocabularies with <unk> --------------------------------


def _write_text_corpus(folder: Path, val_name="valid.txt", extra="é") -> Path:
    """train/valid/test text; valid and test hold `extra`, a character train lacks."""
    folder.mkdir(parents=True, exist_ok=True)
    line = "the cat sat on the mat and the dog ran home\n"
    (folder / "train.txt").write_text(line * 60, encoding="utf-8")
    (folder / val_name).write_text(f"the {extra}cat ran\n" + line * 10, encoding="utf-8")
    (folder / "test.txt").write_text(line * 10 + f"a dog{extra}\n", encoding="utf-8")
    return folder


def _text_cfg(make_cfg, tmp_path, folder, *overrides):
    return make_cfg(
        "data=text", f"data.root={folder}", f"data.cache_dir={tmp_path / 'cache'}", *overrides
    ).data


def test_data_text_reads_a_folder_and_maps_unseen_characters_to_unk(make_cfg, tmp_path):
    folder = _write_text_corpus(tmp_path / "mine", val_name="validation.txt")
    data = load_corpus(_text_cfg(make_cfg, tmp_path, folder))
    chars = sorted(set((folder / "train.txt").read_text(encoding="utf-8")))
    assert data.vocab_size == len(chars) + 1  # + <unk>, last
    assert data.splits["val"].source == str(folder / "validation.txt")
    val = np.asarray(data.splits["val"].tokens)
    text = (folder / "validation.txt").read_text(encoding="utf-8")
    # one token per character, the unseen one included: bits per character stay per character
    assert len(val) == data.splits["val"].n_chars == len(text)
    assert list(np.flatnonzero(val == len(chars))) == [text.index("é")]
    assert split_metrics("val", 1.0, data.splits["val"])["val/bpc"] == pytest.approx(
        1 / math.log(2)
    )
    meta = json.loads(next((tmp_path / "cache" / "text").glob("*/meta.json")).read_text())
    assert [meta["splits"][s]["n_unk"] for s in ("train", "val", "test")] == [0, 1, 1]
    tok = tokenizer_from_json(data.tokenizer_file.read_text(encoding="utf-8"))
    assert tok.symbols == [*chars, "<unk>"] and tok.decode(val[:6].tolist()) == "the <unk>c"


@pytest.mark.parametrize("tokenizer", ["word", "bpe"])
def test_data_text_takes_every_tokenizer(make_cfg, tmp_path, tokenizer):
    folder = _write_text_corpus(tmp_path / "mine")
    overrides = [f"data.tokenizer={tokenizer}"] + (["data.vocab_size=300"] * (tokenizer == "bpe"))
    data = load_corpus(_text_cfg(make_cfg, tmp_path, folder, *overrides))
    assert data.tokenizer == tokenizer and len(data.splits["test"].tokens) > 0


def test_the_cache_keys_on_unk(make_cfg, tmp_path):
    """data.unk=false refuses the character that data.unk=true maps: never one entry for both."""
    folder = _write_text_corpus(tmp_path / "mine")
    load_corpus(_text_cfg(make_cfg, tmp_path, folder))
    with pytest.raises(DataError, match=r"valid\.txt, line 1: character 'é'.*data\.unk=true"):
        load_corpus(_text_cfg(make_cfg, tmp_path, folder, "data.unk=false"))
    (folder / "valid.txt").write_text("the cat ran\n" * 10, encoding="utf-8")
    (folder / "test.txt").write_text("the dog sat\n" * 10, encoding="utf-8")
    plain = load_corpus(_text_cfg(make_cfg, tmp_path, folder, "data.unk=false"))
    with_unk = load_corpus(_text_cfg(make_cfg, tmp_path, folder))
    assert with_unk.vocab_size == plain.vocab_size + 1
    assert len(list((tmp_path / "cache" / "text").glob("*/meta.json"))) == 3


@pytest.mark.parametrize(
    "setup,root,words",
    [
        (lambda f: None, None, "data.root: data=text reads a folder of yours: give data.root=DIR"),
        (lambda f: None, "absent", "data.root: folder"),
        (lambda f: (f / "test.txt").unlink(), "mine", "missing file {f}/test.txt"),
        (lambda f: (f / "val.txt").write_text("x\n"), "mine", "holds both valid.txt and val.txt"),
        (lambda f: (f / "train.txt").write_text(""), "mine", "data file {f}/train.txt is empty"),
    ],
)
def test_data_text_problems_are_one_line(tmp_path, setup, root, words):
    from omegaconf import OmegaConf

    folder = _write_text_corpus(tmp_path / "mine")
    setup(folder)
    cfg = OmegaConf.create(
        {
            "name": "text",
            "tokenizer": "char",
            "root": None if root is None else str(tmp_path / root),
            "cache_dir": str(tmp_path / "cache"),
            "split": "official",
            "vocab_size": None,
            "unk": True,
        }
    )
    with pytest.raises(DataError) as exc:
        load_corpus(cfg)
    assert words.format(f=folder) in str(exc.value) and "\n" not in str(exc.value)


def test_a_char_vocabulary_with_unk_round_trips_and_generation_maps_unknown_characters():
    from moa_train.generation import encode_prompt

    with_unk = tokenizer_from_json(tokenizer_json(CharTokenizer("ab\n", True)))
    assert with_unk.symbols == ["\n", "a", "b", "<unk>"] and with_unk.unk_id == 3
    notes = []
    assert encode_prompt(with_unk, "abz", 16, warn=notes.append) == [1, 2, 3]
    assert notes == ["prompt 'abz': 'z' not in the run's char vocabulary: mapped to <unk>"]
    plain = tokenizer_from_json(tokenizer_json(CharTokenizer("ab\n")))
    assert plain.unk_id is None and plain.vocab_size == 3
    with pytest.raises(ValueError, match="'z' not in the run's char vocabulary, which has no"):
        encode_prompt(plain, "abz", 16)
    with pytest.raises(DataError, match="single characters"):
        tokenizer_from_json('{"kind": "char", "symbols": ["a", "bc"]}')


def test_a_text_run_saves_its_unk_vocabulary_for_generation(train_run, tmp_path):
    from moa_train.api import load_tokenizer
    from moa_train.generation import encode_prompt

    folder = _write_text_corpus(tmp_path / "mine")
    run = tmp_path / "run"
    train_run(
        run,
        "data=text",
        f"data.root={folder}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=1",
        "trainer.block_size=8",
    )
    tok = load_tokenizer(run)
    notes = []
    ids = encode_prompt(tok, "the ü", 64, warn=notes.append)
    assert ids[-1] == tok.unk_id == tok.vocab_size - 1 and len(notes) == 1
