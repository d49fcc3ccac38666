"""Extending the package from outside it (moa_train/plugins.py): a module named in MOA_PLUGINS
registers a part, a folder on Hydra's search path brings its YAML; nothing inside the package is
edited."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from moa_train.plugins import PluginError, load_plugins

CORPUS_PLUGIN = """
from moa_train.data.corpora import LM_CORPORA
from moa_train.data.text_corpus import TextCorpus

LM_CORPORA["tales_char"] = TextCorpus(
    "tales", "tales", {"train": "a.txt", "val": "b.txt", "test": "c.txt"}
)
"""
CORPUS_YAML = """\
name: tales_char
tokenizer: char
root: {root}
cache_dir: ${{oc.env:MOA_CACHE_DIR}}
split: official
"""


@pytest.mark.slow
def test_a_new_lm_corpus_trains_through_the_cli(data_root, tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "tales_corpus.py").write_text(CORPUS_PLUGIN)
    (tmp_path / "configs" / "data").mkdir(parents=True)
    (tmp_path / "configs" / "data" / "tales_char.yaml").write_text(
        CORPUS_YAML.format(root=tmp_path / "text")
    )
    (tmp_path / "text" / "tales").mkdir(parents=True)
    for src, dst in (("train", "a"), ("valid", "b"), ("test", "c")):
        (tmp_path / "text" / "tales" / f"{dst}.txt").write_text(
            (data_root / "wikitext-2" / f"{src}.txt").read_text()
        )
    env = {
        **os.environ,
        "MOA_PLUGINS": "tales_corpus",
        "MOA_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), str(REPO)]),
    }
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moa_train",
            "debug=tiny",
            "data=tales_char",
            "trainer.max_steps=3",
            f"hydra.searchpath=[file://{tmp_path / 'configs'}]",
            f"hydra.run.dir={run}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert list((tmp_path / "cache" / "tales").iterdir())  # the corpus' own cache folder


def test_the_corpus_table_keeps_its_documented_plugin_path():
    """Plugins written against `moa_train.data.wikitext.LM_CORPORA` (the table's former home) add
    to the one table the loader reads."""
    from moa_train.data import corpora
    from moa_train.data.wikitext import LM_CORPORA, TextCorpus

    assert LM_CORPORA is corpora.LM_CORPORA and TextCorpus is corpora.TextCorpus


def test_an_unknown_plugin_is_one_line(monkeypatch):
    with pytest.raises(PluginError, match="MOA_PLUGINS: no module named 'no_such_plugin_module'"):
        load_plugins("no_such_plugin_module")
    proc = subprocess.run(
        [sys.executable, "-m", "moa_train", "debug=tiny"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MOA_PLUGINS": "no_such_plugin_module"},
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: MOA_PLUGINS: no module named 'no_such_plugin_module' (is its folder on PYTHONPATH?)"
    ], proc.stderr
    monkeypatch.setenv("MOA_PLUGINS", " json , os.path ")
    assert [m.__name__ for m in load_plugins()] == ["json", os.path.__name__]


def test_a_failing_import_inside_a_plugin_is_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("import no_such_dependency_of_the_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_of_the_plugin"):
        load_plugins("broken_plugin")
