"""Parallel corpora (WMT14 En-De, Multi30k En-De) as joint-BPE sentence pairs, and token-budget
batches of them.

Files, one sentence per line and parallel by line, under the data folder (`data.root`, MOA_DATA_DIR,
the recorded one or ../shared/data: data/root.py):
  wmt14_en_de     wmt14-en-de/{train,valid,test}.{en,de} (valid newstest2013, test newstest2014)
  multi30k_en_de  multi30k/{train,val,test_2016_flickr}.{en,de}
Where there is no data folder or it lacks the dataset's folder, the files are written once from
the `datasets` hub copy into `<cache_dir>/download/<folder>/`; offline, a clear error says how to
set the data folder.

One byte-level BPE is trained on the train text of both languages (ids 0..3 = <pad> <s> </s> <unk>).
The tokenizer and the ids of every split are cached per language under
`<cache_dir>/translation/<fingerprint>/`, so en->de and de->en share one cache and a second load
neither retrains nor re-encodes. `task.max_len` is applied at load time, to the train split only:
val/test keep every line, since their raw target lines are the BLEU references. A model with
`max_positions` positions gets val/test ids cut to max_positions - 1 tokens (a BOS or EOS makes
max_positions), so that a long evaluation line cannot overflow the position table; only lines that
would not fit are cut.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moa_train.data.batches import to_device
from moa_train.data.cache import CacheDamaged, check_ids, content_key, load_cached
from moa_train.data.corpus import (
    DataError,
    check_readable,
    expand,
    read_text,
    table_entry,
    train_bpe,
)
from moa_train.data.root import download, find_root, how_to_set
from moa_train.progress import progress

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
DEFAULT_VOCAB = 8000
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Corpus:
    folder: str  # under data.root
    stems: dict  # split -> file stem; files are <stem>.<lang>
    hub: tuple  # load_dataset arguments
    hub_splits: dict  # split -> hub split name
    # hub rows are {"translation": {lang: text}} (wmt14) rather than {lang: text} columns
    nested: bool
    # language codes: the files' suffixes, the values of task.src and task.tgt
    langs: tuple = ("en", "de")

    @property
    def sides(self) -> list:
        """The languages in the order both sides are trained and stored in, whatever the
        direction."""
        return sorted(self.langs)


CORPORA = {
    "wmt14_en_de": Corpus(
        "wmt14-en-de",
        {"train": "train", "val": "valid", "test": "test"},
        ("wmt14", "de-en"),
        {"train": "train", "val": "validation", "test": "test"},
        nested=True,
    ),
    "multi30k_en_de": Corpus(
        "multi30k",
        {"train": "train", "val": "val", "test": "test_2016_flickr"},
        ("bentrevett/multi30k",),
        {"train": "train", "val": "validation", "test": "test"},
        nested=False,
    ),
}


@dataclass
class ParallelSplit:
    # 1-D np.int32 BPE ids per source sentence (no BOS/EOS); val/test: cut to the model's positions
    src: list
    tgt: list  # the same for targets
    src_text: list  # raw source lines (never cut)
    tgt_text: list  # raw target lines: the BLEU references (never cut)
    # train only: pairs left out for an empty side or a side longer than task.max_len
    n_dropped: int = 0
    # val/test only: pairs with a side whose ids were cut to fit the model's positions
    n_truncated: int = 0

    def __len__(self) -> int:
        return len(self.src)


@dataclass
class ParallelData:
    splits: dict  # "train" | "val" | "test" -> ParallelSplit
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    tokenizer_path: str  # the saved `tokenizers` JSON
    # loaded from tokenizer_path when not given
    tokenizer: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.tokenizer is None:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(self.tokenizer_path)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        """ids (list, array or 1-D tensor) -> text: stops at the first </s>, skips <pad> and <s>."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        text = self.tokenizer.decode(
            [i for i in ids if i not in (self.pad_id, self.bos_id)], skip_special_tokens=False
        )
        return text[1:] if text.startswith(" ") else text  # the space add_prefix_space put in front


# --- locating and reading the files ---------------------------------------------------------------


def _expected(corpus: Corpus) -> str:
    return f"{corpus.folder}/{{{','.join(corpus.stems.values())}}}.{{{','.join(corpus.langs)}}}"


def _files(folder: Path, corpus: Corpus) -> dict:
    return {
        (split, lang): folder / f"{stem}.{lang}"
        for split, stem in corpus.stems.items()
        for lang in corpus.sides
    }


def _download(corpus: Corpus, cache: Path, root, fetch: bool) -> Path | None:
    """The download folder in the cache holding the files, written from the `datasets` hub copy
    where they are not there yet (fetch False: None instead, unless the download evidently cannot
    work)."""
    target = cache / "download" / corpus.folder
    files = _files(target, corpus)

    def texts(ds):
        for (split, lang), path in files.items():
            rows = ds[corpus.hub_splits[split]]
            lines = [t[lang] for t in rows["translation"]] if corpus.nested else rows[lang]
            yield path.name, "".join(s.replace("\r", " ").replace("\n", " ") + "\n" for s in lines)

    missing = f"{_expected(corpus)}: " + (
        "no data folder is set" if root.path is None else f"not in {root.path} ({root.how})"
    )
    names = [path.name for path in files.values()]
    return target if download(target, names, corpus.hub, texts, missing, fetch) else None


def locate(cfg, corpus: Corpus, cache: Path, fetch: bool = True) -> Path | None:
    """The folder holding the corpus' files, every file checked so a missing one is named:
    <data folder>/<corpus.folder> (the data folder as root.find_root finds it), else the download
    folder in the cache. fetch False (a check before the run): nothing downloaded, None where a
    download would be tried."""
    root = find_root(cfg.root)
    folder = None if root.path is None else root.path / corpus.folder
    if folder is None or not folder.is_dir():
        folder = _download(corpus, cache, root, fetch)
        if folder is None:
            return None
    for path in _files(folder, corpus).values():
        if not path.is_file():
            raise DataError(
                f"data.root: missing file {path}; expected {_expected(corpus)} under "
                f"{folder.parent}; {how_to_set(corpus.folder + '/')}"
            )
        check_readable(path)
    return folder


def _corpus(cfg) -> Corpus:
    return table_entry(CORPORA, cfg.name, "a translation corpus")


def check_files(cfg) -> None:
    """DataError (the one line the run would end with) where the corpus' files cannot be had;
    nothing is read or downloaded: a check before the run."""
    locate(cfg, _corpus(cfg), expand(cfg.cache_dir), fetch=False)


def read_lines(path: Path) -> list:
    """Lines without their '\\n' (or '\\r\\n'); split on '\\n' only, so line numbers agree with `wc
    -l` and editors."""
    lines = read_text(path, newline="").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [s[:-1] if s.endswith("\r") else s for s in lines]


def read_corpus(folder: Path, corpus: Corpus) -> dict:
    """(split, lang) -> lines, with the checks every split must pass: parallel line counts, some
    text."""
    files = _files(folder, corpus)
    texts = {key: read_lines(path) for key, path in files.items()}
    for split in SPLITS:
        (a, la), (b, lb) = ((files[split, lang], len(texts[split, lang])) for lang in corpus.sides)
        if la != lb:
            raise DataError(
                f"data files {a} ({la} lines) and {b} ({lb} lines) are not parallel: "
                f"their line counts differ"
            )
        for lang in corpus.sides:
            if not any(s.strip() for s in texts[split, lang]):
                raise DataError(
                    f"data split {split!r} is empty: {files[split, lang]} holds no sentences"
                )
    return texts


# --- tokenizer and cache --------------------------------------------------------------------------


def encode_lines(tok, lines: list) -> tuple:
    """-> (all ids concatenated as int32, offsets of n+1 int64): sentence i is
    ids[offsets[i]:offsets[i+1]]."""
    encs = tok.encode_batch(lines, add_special_tokens=False)
    offsets = np.zeros(len(encs) + 1, dtype=np.int64)
    np.cumsum([len(e.ids) for e in encs], out=offsets[1:])
    ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.int32, count=int(offsets[-1]))
    return ids, offsets


def _fingerprint(name: str, pairs, folder: Path, corpus: Corpus, vocab_size: int) -> str:
    return content_key(
        _files(folder, corpus).values(),
        f"{name}:{sorted((pairs.src, pairs.tgt))}:{vocab_size}:{CACHE_VERSION}",
    )


def _build(texts: dict, corpus: Corpus, vocab_size: int, out: Path) -> None:
    """One byte-level BPE for both languages, with SPECIALS at ids 0..3, and every file's ids."""
    tok = train_bpe(
        [s for lang in corpus.sides for s in texts["train", lang]],
        vocab_size,
        out / "tokenizer.json",
        specials=SPECIALS,
        unk="<unk>",
        prefix_space=True,
    )
    for (split, lang), lines in progress(texts.items(), desc="caching token ids", unit="file"):
        ids, offsets = encode_lines(tok, lines)
        np.save(out / f"{split}.{lang}.ids.npy", ids)
        np.save(out / f"{split}.{lang}.offsets.npy", offsets)
    meta = {
        "vocab_size": tok.get_vocab_size(),
        "version": CACHE_VERSION,
        "lines": {f"{split}.{lang}": len(lines) for (split, lang), lines in texts.items()},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as exc:  # missing, truncated or garbled
        raise CacheDamaged(f"{path.name}: {str(exc).splitlines()[0]}") from None


def _load_ids(out: Path, split: str, lang: str, n_lines: int, vocab_size: int) -> list:
    """One file's sentences as id arrays, checked against meta.json (CacheDamaged if they do not
    match)."""
    ids_path = out / f"{split}.{lang}.ids.npy"
    ids, offsets = _read_npy(ids_path), _read_npy(out / f"{split}.{lang}.offsets.npy")
    if len(offsets) != n_lines + 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise CacheDamaged(
            f"{split}.{lang}.offsets.npy does not describe the {n_lines} lines meta.json names"
        )
    check_ids(ids_path, ids, int(offsets[-1]), vocab_size)
    return np.split(ids, offsets[1:-1])


def _load(out: Path, texts: dict) -> tuple:
    """(meta, tokenizer, (split, lang) -> id arrays) of a cache entry, checked against the text
    files' line counts."""
    from tokenizers import Tokenizer

    meta = json.loads((out / "meta.json").read_text())
    try:
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    # the Rust library raises a bare Exception for a missing or garbled file
    except Exception as exc:
        raise CacheDamaged(f"tokenizer.json cannot be read ({str(exc).splitlines()[0]})") from None
    ids = {}
    for (split, lang), lines in texts.items():
        if meta["lines"][f"{split}.{lang}"] != len(lines):
            raise CacheDamaged(
                f"meta.json counts {meta['lines'][f'{split}.{lang}']} lines of {split}.{lang}, "
                f"the file {len(lines)}"
            )
        ids[split, lang] = _load_ids(out, split, lang, len(lines), meta["vocab_size"])
    return meta, tok, ids


def _split(
    ids: dict, texts: dict, split: str, src: str, tgt: str, max_len: int, eval_len: int | None
) -> ParallelSplit:
    s = ParallelSplit(ids[split, src], ids[split, tgt], texts[split, src], texts[split, tgt])
    # every line stays (the references); ids past eval_len would not fit the positions
    if split != "train":
        n = (
            0
            if eval_len is None
            else sum(
                len(x) > eval_len or len(y) > eval_len for x, y in zip(s.src, s.tgt, strict=True)
            )
        )
        if n:
            s.src, s.tgt = [x[:eval_len] for x in s.src], [y[:eval_len] for y in s.tgt]
            s.n_truncated = n
        return s
    keep = [
        i
        for i, (x, y) in enumerate(zip(s.src, s.tgt, strict=True))
        if 0 < len(x) <= max_len and 0 < len(y) <= max_len
    ]
    if not keep:
        raise DataError(
            f"task.max_len: every training pair is empty or longer than {max_len} BPE tokens"
        )
    if len(keep) == len(s.src):
        return s
    return ParallelSplit(
        *([part[i] for i in keep] for part in (s.src, s.tgt, s.src_text, s.tgt_text)),
        n_dropped=len(s.src) - len(keep),
    )


def load_translation(cfg, max_positions: int | None = None, task=None) -> ParallelData:
    """The data config's corpus as BPE sentence pairs in the direction task.src -> task.tgt, pairs
    with a side longer than task.max_len dropped (`task`: the translation task's config; None: `cfg`
    holds those keys too)."""
    corpus = _corpus(cfg)
    pairs = cfg if task is None else task
    for key, lang in (("task.src", pairs.src), ("task.tgt", pairs.tgt)):
        if lang not in corpus.langs:
            raise DataError(
                f"{key}: {lang!r} is not a language of {cfg.name}; allowed: "
                f"{', '.join(corpus.langs)}"
            )
    if pairs.src == pairs.tgt:
        raise DataError(f"task.src and task.tgt are both {pairs.src!r}; they must differ")
    vocab_size = cfg.vocab_size or DEFAULT_VOCAB
    cache = expand(cfg.cache_dir)
    folder = locate(cfg, corpus, cache)
    texts = read_corpus(folder, corpus)
    out = cache / "translation" / _fingerprint(cfg.name, pairs, folder, corpus, vocab_size)
    meta, tok, ids = load_cached(
        out, lambda tmp: _build(texts, corpus, vocab_size, tmp), lambda entry: _load(entry, texts)
    )
    eval_len = None if max_positions is None else max_positions - 1
    splits = {
        split: _split(ids, texts, split, pairs.src, pairs.tgt, pairs.max_len, eval_len)
        for split in SPLITS
    }
    if splits["val"].n_truncated or splits["test"].n_truncated:
        log.warning(
            "model.max_seq_len=%d: token ids cut to %d for %d of %d val and %d of %d test pairs (a "
            "side was longer; BLEU still scores against the full reference lines)",
            max_positions,
            eval_len,
            splits["val"].n_truncated,
            len(splits["val"]),
            splits["test"].n_truncated,
            len(splits["test"]),
        )
    pad, bos, eos, unk = range(len(SPECIALS))
    return ParallelData(
        splits, meta["vocab_size"], pad, bos, eos, unk, str(out / "tokenizer.json"), tok
    )


# --- batches --------------------------------------------------------------------------------------


def _pad(rows: list, width: int, pad_id: int) -> np.ndarray:
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out


class TokenBatches:
    """Batches of whole sentence pairs holding at most max_tokens tokens each, counted as
    batch_size x (padded src len + padded tgt len + 1).

    `batch_format`: plain (the source as it is, the decoder input starting with BOS) | fairseq
    (every source ends in EOS and the decoder input starts with EOS, as fairseq's translation task
    collates them).

    Pairs are sorted by (source, target) length and cut greedily into batches, so padding is small;
    a pair over max_tokens alone gets a batch of its own. The batches are fixed at construction
    (ties in length broken by a permutation drawn from `seed`); with shuffle=True their order is
    redrawn each epoch from a seeded torch.Generator and iteration never ends; with shuffle=False
    one pass in length order. The state (epoch, batches consumed in it, the generator state at its
    start) resumes exactly mid-epoch. One iterator at a time: iterating advances the state.

    Data parallelism: every rank cuts and orders the same batches (max_tokens is the global budget)
    and keeps its `rank`-th of `world` contiguous slices of each batch's pairs (length-sorted, so
    the slices pad alike); `n_tokens` stays the whole batch's. A batch of fewer pairs than ranks
    leaves some ranks zero rows.
    """

    def __init__(
        self,
        split: ParallelSplit,
        max_tokens: int,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        batch_format: str = "plain",
        shuffle: bool = True,
        seed: int = 0,
        device=torch.device("cpu"),
        rank: int = 0,
        world: int = 1,
    ):
        if max_tokens <= 0:
            raise DataError(f"task.max_tokens: must be positive, got {max_tokens}")
        if len(split.src) == 0:
            raise DataError("TokenBatches: the split holds no sentence pairs")
        self.split, self.max_tokens, self.shuffle, self.device = (
            split,
            max_tokens,
            shuffle,
            torch.device(device),
        )
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.rank, self.world = rank, world
        # fairseq: every source ends in EOS and the decoder input starts with EOS
        self.src_eos = batch_format == "fairseq"
        self.start_id = eos_id if self.src_eos else bos_id
        # >= 1 column
        self.src_len = (
            np.fromiter(map(len, split.src), dtype=np.int64, count=len(split.src)) + self.src_eos
        ).clip(min=1)
        # + bos / eos
        self.tgt_len = np.fromiter(map(len, split.tgt), dtype=np.int64, count=len(split.tgt)) + 1
        order = np.arange(len(self.src_len))
        if shuffle:
            order = torch.randperm(
                len(order), generator=torch.Generator().manual_seed(seed)
            ).numpy()
        # stable: the permutation breaks ties
        order = order[np.lexsort((self.tgt_len[order], self.src_len[order]))]
        self.batches = self._cut(order)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = 0, 0
        self._epoch_state = self.generator.get_state()

    def _cut(self, order: np.ndarray) -> list:
        """Greedy: a pair joins the current batch while the batch, padded to its longest pair, fits
        max_tokens."""
        batches, cur, s_max, t_max = [], [], 0, 0
        for i, s, t in zip(
            order.tolist(), self.src_len[order].tolist(), self.tgt_len[order].tolist(), strict=True
        ):
            if cur and (len(cur) + 1) * (max(s_max, s) + max(t_max, t)) > self.max_tokens:
                batches.append(np.asarray(cur))
                cur, s_max, t_max = [], 0, 0
            cur.append(i)
            s_max, t_max = max(s_max, s), max(t_max, t)
        batches.append(np.asarray(cur))
        return batches

    def __len__(self) -> int:
        return len(self.batches)

    def _order(self) -> list:
        if not self.shuffle:
            return list(range(len(self.batches)))
        self.generator.set_state(self._epoch_state)
        return torch.randperm(len(self.batches), generator=self.generator).tolist()

    def collate(self, index: np.ndarray) -> dict:
        """This rank's slice of the batch of pairs `index`, padded; `n_tokens`: the real target
        tokens (with EOS) of the whole batch. `index` (the pairs' positions in the split, read by
        evaluation only) stays a CPU tensor: copying it to the device every training step, and
        `.tolist()` syncing on it, would be wasted."""
        n_tokens = int(self.tgt_len[index].sum())
        index = np.array_split(index, self.world)[self.rank]
        src = _pad(
            [self.split.src[i] for i in index], int(self.src_len[index].max(initial=1)), self.pad_id
        )
        if self.src_eos:
            src[np.arange(len(index)), self.src_len[index] - 1] = self.eos_id
        tgt_out = _pad(
            [self.split.tgt[i] for i in index], int(self.tgt_len[index].max(initial=1)), self.pad_id
        )
        tgt_in = np.full_like(tgt_out, self.pad_id)
        tgt_in[:, 0], tgt_in[:, 1:] = self.start_id, tgt_out[:, :-1]
        tgt_out[np.arange(len(index)), self.tgt_len[index] - 1] = self.eos_id
        arrays = {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}
        batch = {k: to_device(v, self.device) for k, v in arrays.items()}
        batch["index"] = torch.from_numpy(index.astype(np.int64))
        batch["n_tokens"] = n_tokens
        return batch

    def __iter__(self):
        while True:
            order = self._order()
            for k in range(self.position, len(order)):
                batch = self.collate(self.batches[order[k]])
                self.position = k + 1
                # roll over now, so a state saved here names the next epoch
                if self.position == len(order):
                    self.epoch, self.position = self.epoch + 1, 0
                    self._epoch_state = self.generator.get_state()
                yield batch
            if not self.shuffle:
                return

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator": self._epoch_state.clone(),
            "n_batches": len(self.batches),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["n_batches"] != len(self.batches):
            raise DataError(
                f"data loader state holds {state['n_batches']} batches per epoch, this loader "
                f"{len(self.batches)}: the data or task.max_tokens changed since the checkpoint"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        # .cpu(): a checkpoint loaded onto the GPU moved this ByteTensor too, and a CPU generator
        # takes a CPU state
        self._epoch_state = state["generator"].cpu().clone()
