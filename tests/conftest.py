"""Shared fixtures: a small synthetic WikiText-2 folder, a private cache, Hydra composition and tiny
training runs.

Nothing here reads ../shared/data or the network; every test that trains does so in-process on the
synthetic text.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the package is used from the checkout, installed or not
    sys.path.insert(0, str(REPO))

import moa_train.config  # noqa: E402  (compose_train)
from moa_train.paths import config_dir  # noqa: E402
from moa_train.registration import ensure_registered  # noqa: E402

# the train schema, the package's variants and tasks, as every entry point registers them
ensure_registered()

CONFIG_DIR = config_dir()
REAL_DATA = REPO / ".." / "shared" / "data"

# --- synthetic WikiText-2 -------------------------------------------------------------------------

# a results driver's runs at a tiny size on a CPU (eager, fp32), before each test's own steps
TINY_CPU_RUN = [
    "debug=tiny",
    "trainer.device=cpu",
    "trainer.compile=false",
    "trainer.cuda_graphs=false",
    "trainer.precision=fp32",
    "model.n_head=4",
]

_WORDS = [
    "the",
    "of",
    "and",
    "in",
    "to",
    "a",
    "was",
    "is",
    "for",
    "on",
    "as",
    "by",
    "with",
    "that",
    "his",
    "at",
    "from",
    "it",
    "an",
    "were",
    "which",
    "he",
    "also",
    "be",
    "this",
    "had",
    "first",
    "after",
    "its",
    "new",
    "their",
    "but",
    "or",
    "are",
    "one",
    "has",
    "two",
    "been",
    "who",
    "into",
    "over",
    "other",
    "during",
    "when",
    "while",
    "game",
    "song",
    "album",
    "band",
    "season",
    "war",
    "army",
    "city",
    "river",
    "church",
    "school",
    "film",
    "series",
    "team",
    "player",
    "road",
    "station",
    "released",
    "recorded",
    "played",
    "built",
    "began",
    "became",
    "received",
    "described",
    "located",
    "known",
    "called",
    "considered",
    "north",
    "south",
    "early",
    "later",
    "most",
    "several",
    "many",
    "three",
    "four",
    "between",
    "under",
    "against",
    "following",
    "through",
    "about",
    "around",
    "however",
    "including",
    "century",
    "government",
    "music",
    "history",
    "population",
    "company",
    "ship",
    "battle",
    "chronicles",
    "valkyria",
    "story",
    "development",
    "critics",
    "version",
    "character",
    "design",
    "world",
    "record",
    "year",
    "years",
    "café",
    "naïve",
    "<unk>",
    "<unk>",
    "<unk>",
    "<unk>",
]
_NAMES = [
    "Valkyria",
    "Gallia",
    "Sega",
    "Japan",
    "London",
    "Ohio",
    "Thomas",
    "Mary",
    "Kentucky",
    "Europan",
    "Imperial",
    "Nameless",
    "Honjou",
    "Sakimoto",
    "Ozawa",
    "PlayStation",
    "Tower",
    "Bridge",
    "Lake",
    "George",
]
_PUNCT_TAILS = (" .", " .", " .", " ;", " !", " ?")


def _number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.4:
        return str(rng.randint(1800, 2015))
    if kind < 0.7:
        return f"{rng.randint(1, 99)} @,@ {rng.randint(100, 999)}"
    return f"{rng.randint(0, 99)} @.@ {rng.randint(0, 9)}"


def _sentence(rng: random.Random) -> str:
    out = []
    for i in range(rng.randint(6, 22)):
        r = rng.random()
        if r < 0.08:
            out.append(rng.choice(_NAMES))
        elif r < 0.12:
            out.append(_number(rng))
        elif r < 0.17 and i > 0:
            out.append(rng.choice([",", ",", "@-@", "'s", ":", '"']))
        elif r < 0.19:
            out.append(f"( {rng.choice(_WORDS)} {rng.choice(_WORDS)} )")
        else:
            out.append(rng.choice(_WORDS))
    words = " ".join(out)
    return words[0].upper() + words[1:] + rng.choice(_PUNCT_TAILS)


def _article(rng: random.Random) -> str:
    title = " ".join(rng.choice(_NAMES) for _ in range(rng.randint(1, 3)))
    lines = [" \n", f" = {title} = \n", " \n"]
    for section in range(rng.randint(1, 3)):
        if section:
            lines += [f" = = {rng.choice(_WORDS).capitalize()} {rng.choice(_WORDS)} = = \n", " \n"]
        for _ in range(rng.randint(1, 3)):
            lines.append(" " + " ".join(_sentence(rng) for _ in range(rng.randint(2, 6))) + " \n")
        lines.append(" \n")
    return "".join(lines)


def synthetic_text(seed: int, n_chars: int) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        parts.append(_article(rng))
        size += len(parts[-1])
    return "".join(parts)


def write_wikitext(root: Path, splits=("train", "valid", "test")) -> Path:
    """`root/wikitext-2/{train,valid,test}.txt`: train ~150 KB, valid/test ~20 KB, deterministic."""
    sizes = {"train": (0, 150_000), "valid": (1, 20_000), "test": (2, 20_000)}
    folder = root / "wikitext-2"
    folder.mkdir(parents=True, exist_ok=True)
    # every word, name and punctuation mark once, so valid/test never hold a character train lacks
    vocab_line = (
        " " + " ".join(_WORDS + _NAMES) + " , @-@ 's : \" ( ) @,@ @.@ 0123456789 . ; ! ? \n"
    )
    for name in splits:
        seed, n = sizes[name]
        text = synthetic_text(seed, n)
        if name == "train":
            text = vocab_line + text
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return root


def write_blank_wikitext(root: Path) -> Path:
    """`root/wikitext-2/` whose files are there but hold white space only: a data error found when a
    job reads its data (the precheck finds a missing or unreadable file before the run starts)."""
    folder = root / "wikitext-2"
    folder.mkdir(parents=True)
    for name in ("train", "valid", "test"):
        (folder / f"{name}.txt").write_text(" \n \n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = write_wikitext(tmp_path_factory.mktemp("data"))
    texts = {
        n: (root / "wikitext-2" / f"{n}.txt").read_text(encoding="utf-8")
        for n in ("train", "valid", "test")
    }
    assert set(texts["valid"]) <= set(texts["train"]) and set(texts["test"]) <= set(texts["train"])
    return root


@pytest.fixture(scope="session")
def wikitext_texts(data_root) -> dict:
    folder = data_root / "wikitext-2"
    return {
        n: (folder / f"{n}.txt").read_text(encoding="utf-8") for n in ("train", "valid", "test")
    }


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(data_root, cache_dir, tmp_path_factory):
    """Configs read MOA_DATA_DIR / MOA_CACHE_DIR: point both at session temp folders (never
    ~/.cache), and the measured peak FLOP/s file (MOA_PEAK_FLOPS_FILE) into the latter. The
    recorded data folder is looked for under a temp XDG_CONFIG_HOME (never ~/.config),
    ../shared/data beside the checkout is not searched in-process, and HF_HUB_OFFLINE says no
    download can work (no test probes the network)."""
    import moa_train.data.root

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOA_DATA_DIR", str(data_root))
        mp.setenv("MOA_CACHE_DIR", str(cache_dir))
        mp.setenv("MOA_PEAK_FLOPS_FILE", str(cache_dir / "peak_flops.json"))
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg_config")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(moa_train.data.root, "SEARCHED", ())
        yield


def run_plugin_cli(tmp_path: Path, files: dict, module: str, args: list):
    """`python -m moa_train ARGS` in a fresh process with a plugin: `files` (name -> source) written
    to <tmp_path>/plugin, importable and loaded through MOA_PLUGINS=`module`; a tiny CPU run on
    random tokens (4 steps) in <tmp_path>/run, `args` after the shared ones."""
    import subprocess
    import sys
    import textwrap

    plugin = tmp_path / "plugin"
    plugin.mkdir(exist_ok=True)
    for name, text in files.items():
        (plugin / name).write_text(textwrap.dedent(text))
    env = {
        **os.environ,
        "MOA_PLUGINS": module,
        "HYDRA_FULL_ERROR": "0",
        "PYTHONPATH": os.pathsep.join([str(plugin), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    shared = [
        "debug=tiny",
        "data=random_tokens",
        "data.vocab_size=64",
        "trainer.device=cpu",
        "trainer.max_steps=4",
        "trainer.eval_interval=4",
        "~experiment",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    return subprocess.run(
        [sys.executable, "-m", "moa_train", *shared, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# --- configs and runs -----------------------------------------------------------------------------


def compose_train(*overrides: str):
    """Compose `configs/train.yaml` with the overrides, in-process."""
    return moa_train.config.compose_train(overrides)


@pytest.fixture(scope="session")
def compose_cfg(data_root, cache_dir):
    """compose_cfg(*overrides): `train` on the synthetic data and private cache (no debug
    preset)."""

    def _compose(*overrides: str):
        return compose_train(f"data.root={data_root}", f"data.cache_dir={cache_dir}", *overrides)

    return _compose


@pytest.fixture(scope="session")
def make_cfg(compose_cfg):
    """make_cfg(*overrides): `train` with debug=tiny on the synthetic data and private cache."""

    def _make(*overrides: str):
        return compose_cfg("debug=tiny", *overrides)

    return _make


def read_jsonl(path: Path) -> list:
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


@pytest.fixture(scope="session")
def train_run(make_cfg):
    """train_run(run_dir, *overrides) -> (summary, metrics.jsonl records) of an in-process run."""
    from moa_train.train.loop import train
    from moa_train.train.tasks import validate

    def _run(run_dir: Path, *overrides: str):
        cfg = make_cfg("trainer.device=cpu", *overrides)
        validate(cfg)
        summary = train(cfg, run_dir)
        return summary, read_jsonl(run_dir / "metrics.jsonl")

    return _run


def run_main(argv: list, monkeypatch, capsys) -> tuple:
    """(exit code, stdout + stderr, stderr lines) of `moa-train ARGV` run in-process."""
    monkeypatch.setattr(sys, "argv", ["moa-train", *argv])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    code = 0
    try:
        from moa_train.__main__ import main

        main()
    except SystemExit as stopped:
        code = stopped.code
    finally:  # Hydra configured logging for the job: leave the test session's as it was
        for handler in set(root.handlers) - set(handlers):
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    out = capsys.readouterr()
    return code, out.out + out.err, [line for line in out.err.splitlines() if line.strip()]


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """cli(*overrides) -> run_main's (code, output, stderr lines) of `moa-train debug=tiny
    trainer.device=cpu ...`; the run folder is tmp_path/run unless hydra.run.dir is given or
    `run_dir=False` (Hydra's default under the cwd)."""

    def _run(*overrides: str, run_dir: bool = True) -> tuple:
        given = not run_dir or any(o.startswith("hydra.run.dir=") for o in overrides)
        folder = [] if given else [f"hydra.run.dir={tmp_path}/run"]
        return run_main(
            ["debug=tiny", "trainer.device=cpu", *folder, *overrides], monkeypatch, capsys
        )

    return _run


def pytest_configure(config):
    # tiny models gain nothing from intra-op threads, and two xdist workers (or another job) on two
    # cores make OpenMP threads fight for the cores: one thread per process keeps runs fast and
    # steady
    import torch

    torch.set_num_threads(1)
