"""The package's variants and tasks register by one explicit call
(moa_train.registration.ensure_registered), not when their modules are imported: each case runs in a
fresh interpreter, where nothing has registered yet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TABLES = (
    "from hydra.core.config_store import ConfigStore\n"
    "from moa_train.models.variants import VARIANTS\n"
    "from moa_train.schema import TASK_CONFIGS\n"
    "def tables():\n"
    "    store = ConfigStore.instance().repo\n"
    "    return [list(VARIANTS), list(TASK_CONFIGS), '_schema_mha.yaml' in store.get('model', {}),"
    " 'train_schema.yaml' in store]\n"
)


def run(code: str, **env) -> list:
    """The JSON the last line of `code` prints, run in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", TABLES + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_importing_the_registries_registers_nothing():
    empty = run(
        "import moa_train.models.registry, moa_train.train.task_registry, moa_train.train.loop\n"
        "import json; print(json.dumps(tables()))"
    )
    assert empty == [[], [], False, False]


def test_ensure_registered_fills_the_tables_once_in_the_package_order():
    before, after = run(
        "from moa_train.registration import ensure_registered\n"
        "from moa_train.models.registry import PACKAGE_VARIANTS\n"
        "from moa_train.train.task_registry import PACKAGE_TASKS\n"
        "ensure_registered(); first = tables(); ensure_registered()\n"
        "assert [n for n, *_ in PACKAGE_VARIANTS] == first[0], first\n"
        "assert [n for n, *_ in PACKAGE_TASKS] == first[1], first\n"
        "import json; print(json.dumps([first, tables()]))"
    )
    assert before == after and before[2:] == [True, True]
    assert before[0][:3] == ["mha", "gqa", "mqa"] and before[1] == ["lm", "translation", "mlm"]


def test_a_plugin_registers_after_the_package_whenever_it_is_imported(tmp_path):
    (tmp_path / "early_plugin.py").write_text(
        "from moa_train.models.attention.mha import MHAConfig, MultiHeadAttention\n"
        "from moa_train.models.registry import register\n"
        "register('early', MultiHeadAttention, MHAConfig)\n"
    )
    for code in (
        # a plugin imported before anything called ensure_registered
        "import early_plugin\n"
        + "from moa_train.registration import ensure_registered\nensure_registered()\n",
        # loaded by the entry points' call
        "from moa_train.registration import ensure_registered\nensure_registered(plugins=True)\n",
    ):
        variants, *_ = run(
            code + "import json; print(json.dumps(tables()))",
            PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}",
            MOA_PLUGINS="early_plugin",
        )
        assert variants[0] == "mha" and variants[-1] == "early"


def test_the_config_facade_reads_full_tables():
    variants, tasks, *_ = run(
        "from moa_train.config import VARIANTS, TASK_CONFIGS, compose_train\n"
        "assert compose_train(['model=moa']).model.name == 'moa'\n"
        "import json; print(json.dumps(tables()))"
    )
    assert {"mha", "moa", "switchhead"} <= set(variants) and "lm" in tasks


def test_a_model_built_without_an_entry_point_finds_the_package_variants():
    """model_config (every model's first step) registers the package's variants itself."""
    name, *_ = run(
        "from moa_train.models import build_model\n"
        "m = {'name': 'moa', 'd_model': 32, 'n_head': 4, 'n_layer': 1, 'max_seq_len': 16}\n"
        "import json; print(json.dumps([type(build_model(m, 50)).__name__]))"
    )
    assert name == "LanguageModel"


def test_once_runs_a_registration_at_its_first_call_only_even_when_it_re_enters():
    from moa_train.plugins import once

    calls = []

    @once
    def register():
        calls.append("in")
        register()  # as `register` calls register_package_variants while that registers

    register()
    register()
    assert calls == ["in"]
