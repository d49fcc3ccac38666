"""Translation data: files, joint BPE, the cache, max_len filtering, errors, and TokenBatches.

Everything runs on a small synthetic parallel corpus written into a temp folder (the wmt14-en-de
layout), except one test on the real Multi30k, skipped where ../shared/data/multi30k is absent.
"""

from __future__ import annotations

import math
import random
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REAL_DATA
from moa_train.config import DataConfig
from moa_train.data import translation
from moa_train.data.translation import DataError, ParallelSplit, TokenBatches, load_translation
from moa_train.train.tasks import TranslationConfig

# --- a synthetic parallel corpus ------------------------------------------------------------------

_LEXICON = {  # English -> made-up "German", word by word, with umlauts and ß
    "the": "die",
    "a": "ein",
    "man": "Mann",
    "woman": "Frau",
    "child": "Kind",
    "dog": "Hund",
    "cat": "Katze",
    "house": "Haus",
    "street": "Straße",
    "green": "grünes",
    "big": "großes",
    "small": "kleines",
    "old": "altes",
    "runs": "läuft",
    "walks": "geht",
    "sees": "sieht",
    "eats": "isst",
    "plays": "spielt",
    "over": "über",
    "in": "in",
    "with": "mit",
    "near": "neben",
    "before": "vor",
    "door": "Tür",
    "garden": "Gärten",
    "bridge": "Brücke",
    "beautiful": "schöne",
    "white": "weiße",
    "today": "heute",
    "and": "und",
    "apple": "Äpfel",
    "mouse": "Mäuse",
    "boat": "Boot",
    "ball": "Ball",
    "red": "rote",
    "quickly": "schnell",
}
_WORDS = sorted(_LEXICON)
_TAILS = ((".", "."), ("!", "!"), ("?", "?"), (", today.", ", heute."))
SIZES = {"train": 400, "valid": 60, "test": 50}
LONG = 70  # words of the long pairs placed at line LONG_AT of every file
LONG_AT = 7
EMPTY_AT = 11  # train line whose German side is empty


def _pair(rng: random.Random, n_words: int) -> tuple:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    en_tail, de_tail = rng.choice(_TAILS)
    en = " ".join(words).capitalize() + en_tail
    de = " ".join(_LEXICON[w] for w in words)
    de = de[0].upper() + de[1:] + de_tail
    # quotes on one side only, so the two languages differ in more than words
    if rng.random() < 0.2:
        de = f"„{de}“"
    return en, de


def corpus_lines(split: str) -> tuple:
    rng = random.Random(SIZES[split])
    pairs = [_pair(rng, rng.randint(2, 18)) for _ in range(SIZES[split])]
    pairs[LONG_AT] = _pair(rng, LONG)
    if split == "train":
        pairs[EMPTY_AT] = (pairs[EMPTY_AT][0], "")
    return [p[0] for p in pairs], [p[1] for p in pairs]


def write_corpus(root: Path) -> Path:
    """`root/wmt14-en-de/{train,valid,test}.{en,de}`, deterministic."""
    folder = root / "wmt14-en-de"
    folder.mkdir(parents=True, exist_ok=True)
    for split in SIZES:
        en, de = corpus_lines(split)
        (folder / f"{split}.en").write_text("".join(s + "\n" for s in en), encoding="utf-8")
        (folder / f"{split}.de").write_text("".join(s + "\n" for s in de), encoding="utf-8")
    return root


def data_cfg(root, cache, **overrides):
    fields = {
        "name": "wmt14_en_de",
        "root": None if root is None else str(root),
        "cache_dir": str(cache),
        "vocab_size": 400,
        "max_len": 60,
        **overrides,
    }
    # the data's keys and translation's (task.src, task.max_len ...) in one node: load_translation
    # reads both from it where no task config is given
    return OmegaConf.merge(
        OmegaConf.to_container(OmegaConf.structured(TranslationConfig)),
        OmegaConf.to_container(OmegaConf.structured(DataConfig)),
        fields,
    )


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("parallel"))


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tcache")


@pytest.fixture(scope="module")
def data(corpus_root, module_cache):
    return load_translation(data_cfg(corpus_root, module_cache))


@pytest.fixture
def broken_root(corpus_root, tmp_path) -> Path:
    """A private copy of the corpus, for tests that damage it."""
    shutil.copytree(corpus_root / "wmt14-en-de", tmp_path / "wmt14-en-de")
    return tmp_path


# --- loading --------------------------------------------------------------------------------------


def test_special_ids_and_vocabulary(data):
    assert (data.pad_id, data.bos_id, data.eos_id, data.unk_id) == (0, 1, 2, 3)
    assert [data.tokenizer.id_to_token(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert 256 + 4 < data.vocab_size <= 400
    assert Path(data.tokenizer_path).is_file()
    ids = np.concatenate([x for s in data.splits.values() for x in s.src + s.tgt])
    assert ids.min() >= 4 and ids.max() < data.vocab_size  # specials never come from text


@pytest.mark.parametrize("split,fname", [("val", "valid"), ("test", "test")])
def test_eval_splits_keep_every_line_and_round_trip(data, split, fname):
    en, de = corpus_lines(fname)
    s = data.splits[split]
    assert s.src_text == en and s.tgt_text == de and len(s.src) == len(s.tgt) == len(en)
    assert s.n_dropped == 0
    for ids, text in zip(s.src + s.tgt, en + de, strict=True):
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert np.array_equal(data.encode(text), ids)
        assert data.decode(ids) == text


def test_decode_accepts_tensors_stops_at_eos_and_skips_pad_bos(data):
    ids = data.encode("Die große Straße über „Gärten“!")
    assert ids.dtype == np.int32
    framed = torch.tensor([data.bos_id, *ids.tolist(), data.eos_id, *ids.tolist(), data.pad_id])
    assert data.decode(framed) == "Die große Straße über „Gärten“!"
    assert data.decode([data.pad_id, *ids.tolist(), data.pad_id]) == data.decode(ids)


def test_max_len_drops_long_and_empty_training_pairs_only(data):
    en, de = corpus_lines("train")
    train = data.splits["train"]
    assert train.n_dropped == 2  # the long pair and the pair with an empty side
    kept = [i for i in range(len(en)) if i not in (LONG_AT, EMPTY_AT)]
    assert train.src_text == [en[i] for i in kept] and train.tgt_text == [de[i] for i in kept]
    for x, y, xt, yt in zip(train.src, train.tgt, train.src_text, train.tgt_text, strict=True):
        assert 0 < len(x) <= 60 and 0 < len(y) <= 60
        assert np.array_equal(x, data.encode(xt)) and np.array_equal(y, data.encode(yt))
    for split in ("val", "test"):  # the long pairs stay: they are BLEU references
        assert len(data.splits[split].tgt[LONG_AT]) > 60


def test_second_load_reuses_the_cache(corpus_root, module_cache, data, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the cached tokenizer and ids should have been reused")

    monkeypatch.setattr(translation, "train_bpe", refuse)
    monkeypatch.setattr(translation, "encode_lines", refuse)
    again = load_translation(data_cfg(corpus_root, module_cache))
    assert again.tokenizer_path == data.tokenizer_path
    for split in ("train", "val", "test"):
        for a, b in zip(again.splits[split].tgt, data.splits[split].tgt, strict=True):
            assert np.array_equal(a, b)
    # a different max_len filters the same cached ids: no retraining either
    wider = load_translation(data_cfg(corpus_root, module_cache, max_len=1000))
    assert wider.splits["train"].n_dropped == 1 and len(wider.splits["train"]) == SIZES["train"] - 1
    assert [p.name for p in (module_cache / "translation").iterdir()] == [
        Path(data.tokenizer_path).parent.name
    ]


def test_a_changed_file_or_vocabulary_builds_a_new_cache(broken_root, tmp_path):
    first = load_translation(data_cfg(broken_root, tmp_path / "cache"))
    smaller = load_translation(data_cfg(broken_root, tmp_path / "cache", vocab_size=300))
    assert smaller.vocab_size == 300 and smaller.tokenizer_path != first.tokenizer_path
    with (
        open(broken_root / "wmt14-en-de" / "test.en", "a", encoding="utf-8") as f,
        open(broken_root / "wmt14-en-de" / "test.de", "a", encoding="utf-8") as g,
    ):
        f.write("A new line.\n")
        g.write("Eine neue Zeile.\n")
    changed = load_translation(data_cfg(broken_root, tmp_path / "cache"))
    assert changed.tokenizer_path not in (first.tokenizer_path, smaller.tokenizer_path)
    assert changed.splits["test"].tgt_text[-1] == "Eine neue Zeile."
    assert not list((tmp_path / "cache" / "translation").glob("*.tmp*"))


def test_de_en_swaps_the_sides_and_shares_the_cache(corpus_root, module_cache, data, monkeypatch):
    monkeypatch.setattr(
        translation, "train_bpe", lambda *a: pytest.fail("de->en should reuse the en->de cache")
    )
    de_en = load_translation(data_cfg(corpus_root, module_cache, src="de", tgt="en"))
    assert de_en.splits["test"].src_text == data.splits["test"].tgt_text
    assert de_en.splits["train"].tgt_text == data.splits["train"].src_text
    for split in ("train", "val", "test"):
        a, b = de_en.splits[split], data.splits[split]
        assert all(np.array_equal(x, y) for x, y in zip(a.src, b.tgt, strict=True))
        assert all(np.array_equal(x, y) for x, y in zip(a.tgt, b.src, strict=True))


def test_crlf_line_ends_are_not_part_of_the_text(broken_root, tmp_path):
    for path in (broken_root / "wmt14-en-de").iterdir():
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    got = load_translation(data_cfg(broken_root, tmp_path / "cache"))
    assert got.splits["test"].tgt_text == corpus_lines("test")[1]
    assert got.decode(got.splits["test"].tgt[0]) == corpus_lines("test")[1][0]


def test_eval_pair_longer_than_the_model_positions_is_cut_and_evaluates(
    compose_cfg, tmp_path, caplog
):
    """A val/test line over model.max_seq_len - 1 tokens used to reach the position table whole and
    fail at the first evaluation; its ids are now cut to max_seq_len - 1, and BLEU still scores the
    full reference."""
    import contextlib
    import logging

    from moa_train.train.tasks import TranslationTask, validate

    rng = random.Random(3)
    folder = tmp_path / "wmt14-en-de"
    folder.mkdir()
    for fname, n in (("train", 100), ("valid", 6), ("test", 6)):
        pairs = [_pair(rng, rng.randint(2, 6)) for _ in range(n)]
        if fname != "train":
            pairs[2] = _pair(rng, 40)  # ~100 BPE tokens a side: far over max_len=24
        for k, lang in enumerate(("en", "de")):
            (folder / f"{fname}.{lang}").write_text(
                "".join(p[k] + "\n" for p in pairs), encoding="utf-8"
            )
    cfg = compose_cfg(
        "experiment=multi30k/mha",
        "data=wmt14_en_de",
        f"data.root={tmp_path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.vocab_size=400",
        "task.max_len=24",
        "task.max_tokens=400",
        "model.max_seq_len=25",
        "model.d_model=32",
        "model.n_head=4",
        "model.n_layer=1",
        "model.n_encoder_layer=1",
        "model.dropout=0.0",
        "trainer.device=cpu",
        "task.beam=2",
    )
    validate(cfg)
    with caplog.at_level(logging.INFO, logger="moa_train.data.translation"):
        task = TranslationTask(cfg, torch.device("cpu"))
    assert any(
        "cut to 24 for 1 of 6 val and 1 of 6 test pairs" in r.getMessage() for r in caplog.records
    )
    d = task.data
    for split, fname in (("val", "valid"), ("test", "test")):
        s = d.splits[split]
        reference = (folder / f"{fname}.de").read_text(encoding="utf-8").split("\n")[2]
        assert s.n_truncated == 1 and s.tgt_text[2] == reference  # the BLEU reference is untouched
        assert len(s.src[2]) == len(s.tgt[2]) == 24 and np.array_equal(
            s.tgt[2], d.encode(reference)[:24]
        )
        assert len(d.encode(s.src_text[2])) > 24 and len(d.encode(reference)) > 24
    val = task.evaluate(task.model, "val", "val", contextlib.nullcontext)  # greedy
    test = task.evaluate(task.model, "test", "test", contextlib.nullcontext, final=True)  # beam 2
    # every line decoded (evaluate looks each one up) and scored against the references
    assert all(
        math.isfinite(m[f"{k}/{key}"])
        for m, k in ((val, "val"), (test, "test"))
        for key in ("loss", "bleu")
    )


# --- errors ---------------------------------------------------------------------------------------


def test_missing_file_is_named(broken_root, tmp_path):
    (broken_root / "wmt14-en-de" / "valid.de").unlink()
    with pytest.raises(DataError, match=r"missing file .*valid\.de"):
        load_translation(data_cfg(broken_root, tmp_path / "cache"))


def test_mismatched_line_counts_name_both_files(broken_root, tmp_path):
    with open(broken_root / "wmt14-en-de" / "train.en", "a", encoding="utf-8") as f:
        f.write("One more line.\n")
    with pytest.raises(DataError) as err:
        load_translation(data_cfg(broken_root, tmp_path / "cache"))
    msg = str(err.value)
    assert "train.en (401 lines)" in msg and "train.de (400 lines)" in msg and "\n" not in msg


def test_non_utf8_file_names_the_line(broken_root, tmp_path):
    path = broken_root / "wmt14-en-de" / "test.de"
    lines = path.read_bytes().split(b"\n")
    lines[6] = "Grüße".encode("latin-1")
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"test\.de is not UTF-8 text \(line 7\)"):
        load_translation(data_cfg(broken_root, tmp_path / "cache"))


def test_empty_split_is_refused(broken_root, tmp_path):
    for lang in ("en", "de"):
        (broken_root / "wmt14-en-de" / f"valid.{lang}").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="split 'val' is empty"):
        load_translation(data_cfg(broken_root, tmp_path / "cache"))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"src": "fr"}, "task.src: 'fr'"),
        ({"src": "de", "tgt": "de"}, "must differ"),
        ({"name": "wmt99"}, "data.name: 'wmt99'.*wmt14_en_de, multi30k_en_de"),
        ({"max_len": 2}, "task.max_len"),
    ],
)
def test_bad_config_values(corpus_root, module_cache, data, overrides, match):
    with pytest.raises(DataError, match=match):
        load_translation(data_cfg(corpus_root, module_cache, **overrides))


# --- the download path, with a stand-in for `datasets` --------------------------------------------


def _fake_datasets(monkeypatch, rows_by_split=None):
    """`datasets` replaced, and the network taken as there (the download is tried)."""
    monkeypatch.setattr("moa_train.data.root.offline_reason", lambda: None)

    def load_dataset(*args):
        if rows_by_split is None:
            raise ConnectionError("offline")
        return rows_by_split

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_download_writes_the_files_into_the_cache(tmp_path, monkeypatch):
    hub = {}
    for split, hub_split in (("train", "train"), ("valid", "validation"), ("test", "test")):
        en, de = corpus_lines(split)
        hub[hub_split] = {"en": en, "de": de}  # Multi30k's columns
    _fake_datasets(monkeypatch, hub)
    got = load_translation(data_cfg(tmp_path / "absent", tmp_path / "cache", name="multi30k_en_de"))
    folder = tmp_path / "cache" / "download" / "multi30k"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{stem}.{lang}" for stem in ("train", "val", "test_2016_flickr") for lang in ("en", "de")
    )
    assert got.splits["val"].tgt_text == corpus_lines("valid")[1]
    _fake_datasets(monkeypatch)  # offline now: the written files are used
    again = load_translation(data_cfg(None, tmp_path / "cache", name="multi30k_en_de"))
    assert again.tokenizer_path == got.tokenizer_path


def test_download_of_wmt14_reads_nested_rows(tmp_path, monkeypatch):
    hub = {}
    for split, hub_split in (("train", "train"), ("valid", "validation"), ("test", "test")):
        hub[hub_split] = {
            "translation": [{"de": d, "en": e} for e, d in zip(*corpus_lines(split), strict=True)]
        }
    _fake_datasets(monkeypatch, hub)
    got = load_translation(data_cfg(None, tmp_path / "cache"))
    assert got.splits["test"].src_text == corpus_lines("test")[0]


def test_offline_without_files_names_moa_data_dir(tmp_path, monkeypatch):
    _fake_datasets(monkeypatch)
    with pytest.raises(
        DataError,
        match=r"wmt14-en-de/\{train,valid,test\}\.\{en,de\}.*ConnectionError.*MOA_DATA_DIR",
    ):
        load_translation(data_cfg(tmp_path / "absent", tmp_path / "cache"))


# --- TokenBatches ---------------------------------------------------------------------------------

MAX_TOKENS = 300  # the long test pair (~335 tokens) is over it alone; other pairs take < 110


def _batches(data, split="train", **kwargs):
    kwargs = {"max_tokens": MAX_TOKENS, "seed": 0, **kwargs}
    return TokenBatches(
        data.splits[split], pad_id=data.pad_id, bos_id=data.bos_id, eos_id=data.eos_id, **kwargs
    )


def _take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def test_batches_hold_the_pairs_with_bos_eos_and_padding(data):
    split = data.splits["train"]
    for b in _take(iter(_batches(data)), 10):
        src, tgt_in, tgt_out, index = b["src"], b["tgt_in"], b["tgt_out"], b["index"]
        assert src.dtype == tgt_in.dtype == tgt_out.dtype == index.dtype == torch.long
        assert tgt_in.shape == tgt_out.shape and len(src) == len(tgt_in) == len(index)
        assert b["n_tokens"] == int((tgt_out != data.pad_id).sum())
        for row, i in enumerate(index.tolist()):
            x, y = split.src[i].tolist(), split.tgt[i].tolist()
            assert src[row, : len(x)].tolist() == x and (src[row, len(x) :] == data.pad_id).all()
            assert tgt_in[row, : len(y) + 1].tolist() == [data.bos_id, *y]
            assert tgt_out[row, : len(y) + 1].tolist() == [*y, data.eos_id]
            assert (tgt_in[row, len(y) + 1 :] == data.pad_id).all() and (
                tgt_out[row, len(y) + 1 :] == data.pad_id
            ).all()
        assert (src != data.pad_id).any(1).all()  # no column of pure padding beyond the longest row
        assert (tgt_out[:, -1] != data.pad_id).any() and (src[:, -1] != data.pad_id).any()


def test_batches_respect_max_tokens_except_a_single_long_pair(data):
    batches = _batches(data, split="test", shuffle=False)
    long_seen = 0
    for b in batches:
        size = b["src"].shape[0] * (b["src"].shape[1] + b["tgt_in"].shape[1])
        if size > MAX_TOKENS:
            # over budget alone: a batch of its own, not dropped
            assert b["index"].tolist() == [LONG_AT]
            long_seen += 1
    assert long_seen == 1


def test_every_pair_once_per_epoch_in_a_new_order(data):
    batches = _batches(data)
    it = iter(batches)
    epochs = [_take(it, len(batches)) for _ in range(2)]
    n = len(data.splits["train"])
    for epoch in epochs:
        assert sorted(torch.cat([b["index"] for b in epoch]).tolist()) == list(range(n))
    assert [b["index"].tolist() for b in epochs[0]] != [b["index"].tolist() for b in epochs[1]]
    assert batches.epoch == 2 and batches.position == 0


def test_batches_are_bucketed_by_length(data):
    batches = _batches(data)
    padded = real = 0
    for b in _take(iter(batches), len(batches)):
        padded += b["src"].numel() + b["tgt_in"].numel()
        real += int((b["src"] != data.pad_id).sum()) + b["n_tokens"]
    assert 1 - real / padded < 0.25
    assert len(data.splits["train"]) / len(batches) > 3  # and batches are not just single pairs


def test_unshuffled_pass_is_finite_in_length_order(data):
    batches = _batches(data, split="val", shuffle=False)
    first = [b["index"].tolist() for b in batches]
    assert sorted(i for b in first for i in b) == list(range(len(data.splits["val"])))
    src_lens = [len(data.splits["val"].src[i]) for b in first for i in b]
    assert src_lens == sorted(src_lens)
    assert [b["index"].tolist() for b in batches] == first  # a second pass: the same batches


def test_same_seed_same_order_and_other_seed_another(data):
    def order(seed):
        return [b["index"].tolist() for b in _take(iter(_batches(data, seed=seed)), 30)]

    assert order(3) == order(3)
    assert order(3) != order(4)


@pytest.mark.parametrize("epochs_done", [0, 0.5, 1.3])
def test_state_dict_resumes_exactly(data, epochs_done):
    full = _batches(data, seed=7)
    it = iter(full)
    _take(it, int(epochs_done * len(full)))
    state = full.state_dict()
    expected = [b["index"].tolist() for b in _take(it, 2 * len(full))]
    resumed = _batches(data, seed=7)
    resumed.load_state_dict(state)
    assert [b["index"].tolist() for b in _take(iter(resumed), 2 * len(full))] == expected


def test_state_from_other_batching_is_refused(data):
    state = _batches(data).state_dict()
    with pytest.raises(DataError, match=re.escape("task.max_tokens")):
        _batches(data, max_tokens=2 * MAX_TOKENS).load_state_dict(state)


def test_batch_index_stays_on_the_cpu(data, monkeypatch):
    # only evaluation reads it (.tolist()): not copied to the device each step; a "device" of meta
    # shows what moves
    monkeypatch.setattr(translation, "to_device", lambda x, device: torch.from_numpy(x).to("meta"))
    b = next(iter(_batches(data)))
    assert b["src"].device.type == b["tgt_in"].device.type == b["tgt_out"].device.type == "meta"
    assert (
        b["index"].device.type == "cpu"
        and b["index"].dtype == torch.long
        and len(b["index"]) == len(b["src"])
    )


def test_empty_split_cannot_be_batched():
    with pytest.raises(DataError, match="no sentence pairs"):
        TokenBatches(ParallelSplit([], [], [], []), 100, 0, 1, 2)


# --- the real Multi30k ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not (REAL_DATA / "multi30k").is_dir(), reason="../shared/data/multi30k is absent"
)
def test_real_multi30k(tmp_path):
    cfg = data_cfg(
        REAL_DATA, tmp_path / "cache", name="multi30k_en_de", vocab_size=8000, max_len=256
    )
    d = load_translation(cfg)
    assert d.vocab_size == 8000
    assert (
        len(d.splits["train"]) + d.splits["train"].n_dropped == 29_000
        and d.splits["train"].n_dropped <= 10
    )
    assert len(d.splits["val"]) == 1_014 and len(d.splits["test"]) == 1_000
    first = (
        (REAL_DATA / "multi30k" / "test_2016_flickr.de").read_text(encoding="utf-8").split("\n")[0]
    )
    assert d.splits["test"].tgt_text[0] == first
    assert d.decode(d.splits["test"].tgt[0]) == first


TRANSLATION_CACHE_DAMAGE = {
    "truncated ids": (
        lambda e: (e / "val.de.ids.npy").write_bytes((e / "val.de.ids.npy").read_bytes()[:-12]),
        "val.de.ids.npy",
    ),
    "garbled tokenizer": (
        lambda e: (e / "tokenizer.json").write_text("{not json"),
        "tokenizer.json",
    ),
    "offsets of another file": (
        lambda e: shutil.copy(e / "train.en.offsets.npy", e / "test.en.offsets.npy"),
        "test.en.offsets.npy",
    ),
}


@pytest.mark.parametrize("case", list(TRANSLATION_CACHE_DAMAGE))
def test_damaged_translation_cache_is_rebuilt_with_one_warning(corpus_root, tmp_path, caplog, case):
    damage, words = TRANSLATION_CACHE_DAMAGE[case]
    good = load_translation(data_cfg(corpus_root, tmp_path / "cache"))
    [entry] = (tmp_path / "cache" / "translation").iterdir()
    damage(entry)
    with caplog.at_level("WARNING"):
        again = load_translation(data_cfg(corpus_root, tmp_path / "cache"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "is damaged" in warnings[0] and words in warnings[0], warnings
    for split in ("train", "val", "test"):
        assert all(
            np.array_equal(x, y)
            for x, y in zip(good.splits[split].tgt, again.splits[split].tgt, strict=True)
        )
        assert len(good.splits[split]) == len(again.splits[split])


def test_a_corpus_names_its_own_languages(tmp_path, monkeypatch):
    """Language codes come from the corpus table: an en-fr corpus in the wmt14 layout loads in
    either direction and refuses a language it lacks, naming the ones it has."""
    write_corpus(tmp_path)
    folder = tmp_path / "wmt14-en-de"
    for split in SIZES:
        (folder / f"{split}.de").rename(folder / f"{split}.fr")
    monkeypatch.setitem(
        translation.CORPORA,
        "toy_en_fr",
        translation.Corpus(
            "wmt14-en-de",
            {"train": "train", "val": "valid", "test": "test"},
            (),
            {},
            nested=False,
            langs=("en", "fr"),
        ),
    )
    data = load_translation(
        data_cfg(tmp_path, tmp_path / "cache", name="toy_en_fr", src="fr", tgt="en")
    )
    # the French (ex-German) side
    assert data.splits["val"].src_text[0] == corpus_lines("valid")[1][0]
    with pytest.raises(
        DataError, match=r"task.tgt: 'de' is not a language of toy_en_fr; allowed: en, fr"
    ):
        load_translation(
            data_cfg(tmp_path, tmp_path / "cache", name="toy_en_fr", src="en", tgt="de")
        )
