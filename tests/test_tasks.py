"""The task seam: each task owns its keys under task.* (a config class registered with the task), a
key of another task is refused naming its owner, the keys that moved are named at their old path,
old saved configs load through one versioned upgrade (moa_train/config_format.py), data sets say
which tasks they feed, and a plugin adds a task without editing the package."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, REPO, read_jsonl, run_plugin_cli
from moa_train.config import TASK_CONFIGS, ConfigError
from moa_train.config_format import CONFIG_FORMAT, MOVED, upgrade
from moa_train.train.tasks import TASKS, Task, register_task, saved_config, task_config, validate

DATA = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
OLD = REPO / "tests" / "fixtures" / "old_configs"


def test_every_task_is_registered_with_its_config_class():
    assert {"lm", "translation", "mlm"} <= set(TASKS) == set(TASK_CONFIGS)
    for name in TASKS:
        assert (CONFIG_DIR / "task" / f"{name}.yaml").is_file()
        node = OmegaConf.load(CONFIG_DIR / "task" / f"{name}.yaml")
        assert node.defaults[0] == f"_schema_{name}"


def test_register_task_refuses_what_is_not_a_task():
    with pytest.raises(TypeError, match="not a Task subclass"):
        register_task("bad", object, TASK_CONFIGS["lm"])
    with pytest.raises(TypeError, match="not a TaskConfig subclass"):
        register_task("bad", Task, dict)
    assert "bad" not in TASKS


@pytest.mark.parametrize(
    "args,line",
    [
        (["task.beam=2"], "error: task.beam: belongs to task translation, not lm"),
        (
            ["data=multi30k_en_de", "task.mask_prob=0.2"],
            "error: task.mask_prob: belongs to task mlm, not translation",
        ),
        (
            ["task=mlm", "data=wikitext2_bpe", "task.label_smoothing=0.1"],
            "error: task.label_smoothing: belongs to task translation, not mlm",
        ),
    ],
)
def test_a_key_of_another_task_is_refused_naming_its_owner(cli, args, line):
    code, _, err = cli(*args)
    assert code == 2 and len(err) == 1 and err[0].startswith(line), err


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_key_at_its_old_path_names_the_new_one(cli, old):
    code, _, err = cli("data=multi30k_en_de", f"{old}=1")
    assert code == 2 and len(err) == 1 and f"{old} -> {MOVED[old]}" in err[0], err


def test_task_and_data_mismatch_is_one_line(cli):
    code, _, err = cli("task=lm", "data=multi30k_en_de")
    assert code == 2 and err == [
        (
            "error: task: lm does not fit data=multi30k_en_de (it feeds: translation); use "
            "task=translation or leave task out"
        )
    ]
    code, _, err = cli("task=mlm", "data=wikitext2_char")
    assert code == 2 and err[0].startswith("error: task: mlm does not fit data=wikitext2_char")


@pytest.mark.parametrize("data", DATA)
def test_each_data_set_names_its_default_task_first(data, compose_cfg):
    """A data YAML's default (its defaults' task override) is the first task it feeds, and a run
    of that data alone takes it."""
    node = OmegaConf.load(CONFIG_DIR / "data" / f"{data}.yaml")
    assert node.defaults == [{"override /task@_global_.task": node.tasks[0]}]
    assert set(node.tasks) <= set(TASKS)
    assert compose_cfg(f"data={data}").task.name == node.tasks[0]


@pytest.mark.parametrize(
    "task,data",
    [("lm", "wikitext2_char"), ("translation", "multi30k_en_de"), ("mlm", "wikitext2_bpe")],
)
def test_debug_tiny_composes_and_validates_for_every_task(task, data, make_cfg):
    cfg = make_cfg(f"task={task}", f"data={data}")
    validate(cfg)
    if task == "translation":  # its tiny sizes come from debug_task/tiny_translation.yaml
        assert cfg.task.max_tokens == 1024 and cfg.task.max_sentences == 16


@pytest.mark.parametrize("name", ["translation_mha-seed0", "translation_moa_sparse-seed0"])
def test_an_old_translation_config_upgrades_to_the_task_keys(name):
    old = yaml.safe_load((OLD / f"{name}.yaml").read_text())
    assert "config_format" not in old and "max_tokens" in old["data"]
    new = saved_config(old)
    assert new["config_format"] == CONFIG_FORMAT
    assert new["task"]["name"] == "translation" and new["data"]["tasks"] == ["translation"]
    assert new["task"]["max_tokens"] == old["data"]["max_tokens"]
    assert new["task"]["beam"] == old["eval"]["beam"]
    assert new["task"]["label_smoothing"] == old["trainer"]["label_smoothing"]
    assert "eval" not in new and "label_smoothing" not in new["trainer"]
    assert "max_tokens" not in new["data"] and "task" not in new["data"]
    typed = task_config(new["task"])  # the translation schema takes every key
    assert typed.max_len == old["data"]["max_len"]
    assert saved_config(new) == new  # the current layout is left as it is
    assert old == yaml.safe_load((OLD / f"{name}.yaml").read_text())  # not changed in place


def test_an_old_lm_config_drops_translation_keys_and_keeps_its_own():
    old = {
        "data": {"name": "wikitext2_char", "task": "lm", "max_tokens": 4096, "src": "en"},
        "trainer": {"label_smoothing": 0.0, "max_steps": 3},
        "eval": {"beam": 4, "average_last": 2},
        "task": {"name": "lm"},
    }
    new = upgrade(old)
    assert new["task"] == {"name": "lm", "average_last": 2}
    assert new["data"] == {"name": "wikitext2_char", "tasks": ["lm"]}
    assert new["trainer"] == {"max_steps": 3} and "eval" not in new


def test_a_config_before_named_tasks_takes_its_data_default():
    from moa_train.train.tasks import saved_task

    assert saved_task({"data": {"name": "multi30k_en_de"}}) == "translation"
    assert saved_task({"data": {"name": "wikitext2_bpe"}}) == "lm"


def test_a_newer_config_format_is_refused():
    with pytest.raises(ValueError, match="newer than this moa_train"):
        upgrade({"config_format": CONFIG_FORMAT + 1})


def test_the_sweep_summary_takes_the_task_metrics(tmp_path):
    from moa_train.sweep import job_record, markdown

    job = tmp_path / "0"
    job.mkdir()
    summary = {"val/loss": 1.0, "val/ppl": 2.7, "val/bpc": 9.0, "steps": 3}
    summary["summary_keys"] = ["val/loss", "val/ppl"]
    (job / "summary.json").write_text(json.dumps(summary))
    record = job_record(job)
    assert record["val/ppl"] == 2.7 and "val/bpc" not in record and record["steps"] == 3
    assert "| val/loss | val/ppl | steps |" in markdown([record])


def test_the_headline_is_the_task_s():
    metrics = {"val/loss": 1.0, "val/ppl": 2.0, "val/bpc": 3.0, "val/bleu": 4.0}
    assert TASKS["mlm"].headline_of(metrics) == "val/loss 1.0000 | val/ppl 2.0000"
    assert TASKS["lm"].headline_of(metrics) == "val/loss 1.0000 | val/bpc 3.0000"
    assert TASKS["translation"].headline_of(metrics) == "val/loss 1.0000 | val/bleu 4.0000"


PLUGIN = '''
"""Toy task: the LM with its loss scaled by task.toy_scale (a key of its own)."""
from dataclasses import dataclass
from pathlib import Path

from moa_train.config import ConfigError
from moa_train.train.tasks import LMConfig, LMTask, register_task


@dataclass
class ToyTaskConfig(LMConfig):
    toy_scale: float = 1.0  # the loss is multiplied by it


class ToyTask(LMTask):
    @staticmethod
    def check(cfg, world_size):
        LMTask.check(cfg, world_size)
        if cfg.task.toy_scale <= 0:
            raise ConfigError(f"task.toy_scale: must be > 0, got {cfg.task.toy_scale}")

    def loss(self, model, batch, all_aux):
        total, ce, aux, routings = super().loss(model, batch, all_aux)
        return total * self.cfg.task.toy_scale, ce, aux, routings


register_task("toy_task", ToyTask, ToyTaskConfig, Path(__file__).with_name("toy_task.yaml"))
'''

PLUGIN_YAML = """
defaults:
  - _schema_toy_task
  - _self_
name: toy_task
toy_scale: 2.0
"""


def run_plugin(tmp_path, *overrides):
    return run_plugin_cli(
        tmp_path,
        {"toy_task_plugin.py": PLUGIN, "toy_task.yaml": PLUGIN_YAML},
        "toy_task_plugin",
        ["task=toy_task", "data.tasks=[lm,toy_task]", *overrides],
    )


def test_a_plugin_task_trains_through_the_cli_with_its_key(tmp_path):
    proc = run_plugin(tmp_path, "task.toy_scale=3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert saved.task.name == "toy_task" and saved.task.toy_scale == 3
    assert any("val/loss" in r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl"))


def test_a_plugin_task_validates_its_own_key(tmp_path):
    proc = run_plugin(tmp_path, "task.toy_scale=0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: task.toy_scale: must be > 0, got 0.0"


def test_a_resume_keeps_the_task_and_its_data_keys(compose_cfg):
    """A resumed run keeps task.name and the task's fixed keys (translation's direction and sizes),
    also against a checkpoint of the old layout; its evaluation keys may change."""
    from moa_train.train.loop import check_fixed_settings

    cfg = compose_cfg("data=multi30k_en_de")
    saved = OmegaConf.to_container(cfg, resolve=True)
    check_fixed_settings(saved, compose_cfg("data=multi30k_en_de", "task.beam=2"))
    changed = compose_cfg("data=multi30k_en_de", "task.max_tokens=1024")
    with pytest.raises(
        ConfigError, match=re.escape("task.max_tokens is 8192 in the checkpoint but 1024")
    ):
        check_fixed_settings(saved, changed)
    old = dict(saved, data=dict(saved["data"], task="translation", max_tokens=8192))
    del old["task"], old["config_format"], old["data"]["tasks"]
    with pytest.raises(
        ConfigError, match=re.escape("task.max_tokens is 8192 in the checkpoint but 1024")
    ):
        check_fixed_settings(old, changed)
    with pytest.raises(
        ConfigError, match=re.escape("task.name is 'translation' in the checkpoint but 'lm'")
    ):
        check_fixed_settings(saved, compose_cfg("data=multi30k_en_de", "task=lm"))


def test_wikitext103_absent_is_one_line(cli, tmp_path):
    """data=wikitext103_* reads <root>/wikitext-103/; where it is missing, one line names it."""
    (tmp_path / "empty").mkdir()
    code, _, err = cli("task=mlm", "data=wikitext103_word", f"data.root={tmp_path / 'empty'}")
    assert code == 2 and len(err) == 1 and "wikitext-103" in err[0], err
