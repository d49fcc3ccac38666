"""Bad input that the checks themselves mishandled (issue 28): a check that spun on a huge value or
let it reach an allocation, a full disk while the run folder's logs, Hydra's .hydra/, the run lock
or W&B's files are written, a data file missing or unreadable found only after Hydra had written
the run folder, and the small ones (a removed config group, a !!python tag on the search path,
characters that do not print). Each ends with exit code 2 and one `error:` line, quickly, and
loses nothing the run had written; a run folder made only for the refused run is gone."""

from __future__ import annotations

import errno
import json
import logging
import pathlib
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import read_jsonl, run_main
from moa_train.config import presets
from test_bad_input import assert_error_line, assert_one_line_error, write_multi30k

# --- checks that cost more than the work ----------------------------------------------------------


@contextmanager
def answers_within(seconds: float):
    """A TimeoutError where the code inside runs longer than `seconds` (a check that spins): a
    guard against minutes-long spins, not a timing assertion."""

    def stop(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# (overrides on top of debug=tiny, words the error line holds)
HUGE = {
    "batch of 1e11 not divided by grad_accum": (
        "trainer.batch_size=100000000000 trainer.grad_accum=3",
        [
            "trainer.grad_accum: 3 does not divide",
            "valid: 1, 2, 4, 5, 8",
            "more) ...",
            "50000000000",
        ],
    ),
    "batch of 1e11": (
        "trainer.batch_size=100000000000",
        ["trainer.batch_size: ", "needs at least"],
    ),
    "d_model of 1e11 not divided by n_head": (
        "model.d_model=100000000000 model.n_head=3",
        ["model.n_head: 3 does not divide model.d_model=100000000000", "valid: 1, 2, 4"],
    ),
    "d_model of 1e11": ("model.d_model=100000000000", ["model.d_model", "weights and optimizer"]),
    "batch beyond 64 bits": (
        "trainer.batch_size=1000000000000000000000",
        ["trainer.batch_size: must be within", "64-bit"],
    ),
    "position table of 2e9 positions": (
        "model.max_seq_len=2000000000",
        ["model.max_seq_len: the position table", "model.max_seq_len=2000000000 x model.d_model"],
    ),
    "sinusoidal table of 2e9 positions": (
        "experiment=multi30k/mha model.max_seq_len=2000000000 model.positions=sinusoidal",
        ["model.max_seq_len: the position table"],
    ),
    "vocabulary of 1e11": (
        "model.vocab_size=100000000000",
        ["model.vocab_size: the embedding", "needs at least"],
    ),
    "1e9 MoA experts": (
        "model=moa model.n_experts=1000000000",
        ["model.d_model: 2 layers of model=moa", "parameters each", "needs at least"],
    ),
    "MoA heads of 1e8": ("model=moa model.head_dim=100000000", ["layers of model=moa"]),
    "MoAS router of 1e11": (
        "model=moas_dynamic model.router_hidden=100000000000",
        ["layers of model=moas_dynamic"],
    ),
    "random tokens beyond int32": (
        "data=random_tokens data.vocab_size=3000000000",
        ["data.vocab_size", "2..2,147,483,648"],
    ),
    "BPE vocabulary of 1e11": (
        "data=wikitext2_bpe data.vocab_size=100000000000",
        ["data.vocab_size", "<= 16,777,216"],
    ),
    "evaluation batch of 1e11": (
        "trainer.eval_batch_size=100000000000",
        ["trainer.eval_batch_size: ", "to evaluate", "lower trainer.eval_batch_size"],
    ),
    "a multirun of 1e11 jobs": (
        "-m trainer.seed=range(0,100000000000)",
        ["trainer.seed=range(0,100000000000): the multirun makes 100,000,000,000 jobs"],
    ),
    "a range of step 0": ("-m trainer.seed=range(0,10,0)", ["trainer.seed", "step must not be 0"]),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_huge_values_are_refused_at_once(cli, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # where a multirun's default sweep folder would go
    overrides, words = HUGE[case]
    with answers_within(10):
        result = cli(*overrides.split())
    assert_one_line_error(result, words, tmp_path)
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_divisors_of_any_number_answer_at_once():
    from moa_train.config import _divisors

    with answers_within(10):
        assert _divisors(384) == "1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 384"
        assert _divisors(10**18).startswith("1, 2, 4, 5, 8, 10,")
        assert _divisors(10**18).endswith(", 500000000000000000, 1000000000000000000")
        assert "not searched" in _divisors(2**61 - 1)  # a prime: searched up to 10^6 only


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("preset", presets())
def test_each_variant_counts_its_attention_parameters(compose_cfg, preset, bias):
    """The memory check counts a variant's attention from its config: what its module holds."""
    from moa_train.models.registry import build_attention

    m = compose_cfg(
        f"model={preset}", "model.d_model=48", "model.n_head=6", f"model.bias={bias}"
    ).model
    built = sum(p.numel() for p in build_attention(m).parameters())
    assert OmegaConf.get_type(m).attention_params(m) == built


@pytest.mark.parametrize(
    "overrides",
    [
        ("model=moa", "model.vocab_size=300"),
        ("data=random_tokens", "model=moas_dynamic"),
        ("experiment=multi30k/moa", "model.cross.name=mha"),
        ("experiment=multi30k/mha", "model.positions=learned"),
    ],
)
def test_the_model_size_is_a_lower_bound(make_cfg, overrides):
    """A model is never refused for more than it holds: the task's count is at most the model's."""
    import torch

    from moa_train.train.tasks import task_class

    cfg = make_cfg(*overrides)
    task = task_class(cfg.task.name)
    counted = sum(p.params for p in task.model_size(cfg))
    vocab = cfg.model.vocab_size or (cfg.data.vocab_size if cfg.data.name == "random_tokens" else 8)
    with torch.device("meta"):  # the sizes only: nothing allocated
        model = task.build_model(cfg.model, vocab, 0)
    # all but the norms (and a translation model's vocabulary, here 8 tokens)
    assert counted <= sum(p.numel() for p in model.parameters()) < 1.05 * counted


# --- a full disk while the run folder is written --------------------------------------------------

NO_SPACE = (errno.ENOSPC, "No space left on device")


class FullDisk:
    """A file whose `nth` write fails as on a full disk, its first half landing (a line cut short);
    the writes after it fail too."""

    def __init__(self, file, nth: int):
        self.file, self.nth, self.writes = file, nth, 0

    def write(self, data):
        self.writes += 1
        if self.writes < self.nth:
            return self.file.write(data)
        if self.writes == self.nth:
            self.file.write(data[: len(data) // 2])
            self.file.flush()
        raise OSError(*NO_SPACE)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def fill_disk(monkeypatch, target: Path, nth: int = 1) -> None:
    """The `nth` write to the file `target` (or to its temp file) fails as on a full disk, and every
    later one, whichever way the code writes it: open() in moa_train's writers, Path.write_text."""

    def meant(path) -> bool:
        path = Path(path)
        return path.parent == target.parent and target.name in path.name

    def fake_open(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)  # noqa: SIM115  (the caller closes it)
        return FullDisk(file, nth) if meant(path) and ("w" in mode or "a" in mode) else file

    import moa_train.io
    import moa_train.metrics.sinks

    for module in (moa_train.io, moa_train.metrics.sinks):
        monkeypatch.setattr(module, "open", fake_open, raising=False)
    real_write_text = pathlib.Path.write_text

    def write_text(self, data, *args, **kwargs):
        if meant(self):
            raise OSError(*NO_SPACE)
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


TEN = ("model=mha", "trainer.max_steps=10", "trainer.eval_interval=5", "trainer.log_interval=1")


def assert_kept(run: Path, steps: int) -> None:
    """The checkpoint of step `steps` whole (its sidecar matches) and the metrics lines up to it
    (whole lines: the one a full disk cut short is dropped by a resume)."""
    from moa_train.train.checkpoint import verify

    assert verify(run / "checkpoints" / f"step_{steps:07d}.pt")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.endswith("}")]
    assert [r["step"] for r in records if "train/loss" in r][:steps] == list(range(1, steps + 1))


def test_full_disk_while_logging_metrics_is_one_line_and_loses_nothing(cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        fill_disk(mp, run / "metrics.jsonl", 8)  # step 7's line: after step 5's checkpoint
        result = cli(*TEN)
    assert_error_line(
        result,
        [f"{run / 'metrics.jsonl'} could not be written (No space left on device)", "resume"],
    )
    assert_kept(run, 5)
    assert not (run / "checkpoints" / "step_0000010.pt").exists()
    assert cli(*TEN)[0] == 0  # space freed: the same command resumes; each step logged once
    logged = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert logged == list(range(1, 11))


@pytest.mark.parametrize("name", ["summary.json", "tokenizer.json"])
def test_full_disk_while_writing_a_run_file_is_one_line(cli, tmp_path, monkeypatch, name):
    run = tmp_path / "run"
    fill_disk(monkeypatch, run / name)
    assert_error_line(cli(*TEN), [f"{run / name} could not be written (No space left on device)"])
    assert not (run / name).exists()
    if name == "summary.json":  # the last step's checkpoint and every metrics line are kept
        assert_kept(run, 10)


def test_full_disk_while_writing_tensorboard_is_one_line(cli, tmp_path, monkeypatch):
    from tensorboard.compat.tensorflow_stub.io.gfile import LocalFileSystem

    real, count = LocalFileSystem.append, {"appends": 0}

    def append(self, filename, content, binary_mode=False):
        count["appends"] += 1
        if count["appends"] >= 60:  # some steps in
            raise OSError(*NO_SPACE)
        return real(self, filename, content, binary_mode)

    monkeypatch.setattr(LocalFileSystem, "append", append)
    run = tmp_path / "run"
    assert_error_line(
        cli(*TEN, "logger=tensorboard"),
        [f"{run / 'tensorboard'} could not be written (No space left on device)"],
    )
    assert (run / "metrics.jsonl").read_text()  # the other logs are kept


def test_full_disk_while_writing_the_log_is_one_line(cli, tmp_path, monkeypatch):
    real = logging.FileHandler._open
    monkeypatch.setattr(logging.FileHandler, "_open", lambda self: FullDisk(real(self), 9))
    run = tmp_path / "run"
    assert_error_line(
        cli(*TEN), [f"{run / 'train.log'} could not be written (No space left on device)"]
    )
    assert_kept(run, 5)


def test_full_disk_while_recording_a_failed_job_stops_the_multirun(tmp_path, monkeypatch, capsys):
    import moa_train.train.loop
    from moa_train.config import ConfigError

    def broken(*args, **kwargs):
        raise ConfigError("trainer.x: a failure of this job")

    monkeypatch.setattr(moa_train.train.loop, "train", broken)
    fill_disk(monkeypatch, tmp_path / "sweep" / "0" / "error.txt")
    command = ["-m", "debug=tiny", "trainer.device=cpu", f"hydra.sweep.dir={tmp_path}/sweep"]
    result = run_main(command, monkeypatch, capsys)
    assert_error_line(
        result,
        [
            f"{tmp_path / 'sweep' / '0' / 'error.txt'} could not be written (No space left on",
            "the multirun stops; job 0 failed: trainer.x: a failure of this job",
        ],
    )


# --- small ones -----------------------------------------------------------------------------------

SMALL = {
    "model group removed": (
        "~model",
        ["~model: the model group cannot be removed", "model=NAME", "allowed: gqa, "],
    ),
    "model group emptied": ("model=null", ["model=null: the model group cannot be removed"]),
    "debug group removed": ("~debug", ["~debug: the debug group cannot be removed"]),
    "logger set to null": ("logger=null", ["logger=null", "write ~logger"]),
    "newline in experiment_name": (
        "experiment_name=a\nb",
        ["experiment_name: the value 'a\\nb' holds \\n (U+000A)"],
    ),
    "quoted newline in experiment_name": (
        "experiment_name='a\nb'",
        ["experiment_name: 'a\\nb' holds a character that does not print"],
    ),
    "right-to-left override in a value": (
        "experiment_name=x\u202ey",
        ["experiment_name: the value 'x\\u202ey' holds \\u202e (U+202E RIGHT-TO-LEFT OVERRIDE)"],
    ),
    "right-to-left override in a quoted group choice": (
        "model='fo\u202eo'",
        ["model=fo\\u202eo: no such config"],
    ),
}


@pytest.mark.parametrize("case", list(SMALL))
def test_small_bad_input_is_one_line(cli, tmp_path, case):
    override, words = SMALL[case]
    result = cli(override)
    assert_one_line_error(result, words, tmp_path)
    assert all(c.isprintable() for c in result[2][0])  # nothing hidden in the line


def test_python_tag_on_the_search_path_is_one_line_and_never_runs(cli, tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "experiment").mkdir()
    evil = tmp_path / "experiment" / "evil.yaml"
    evil.write_text(
        "# @package _global_\ntrainer:\n"
        f"  max_steps: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    result = cli(f"hydra.searchpath=[file://{tmp_path}]", "experiment=evil")
    assert_one_line_error(
        result,
        [f"{evil}, line 3", "!!python/object/apply:os.system", "nothing of it ran"],
        tmp_path,
    )
    assert not marker.exists()


@pytest.mark.parametrize("data", ["wikitext2_char", "multi30k_en_de"])
def test_unreadable_data_file_is_one_line(cli, tmp_path, monkeypatch, data_root, data):
    """A data file the OS refuses to read (chmod 000; root reads anything, so open() is told to
    refuse): refused before Hydra writes the run folder."""
    import builtins

    extra = []
    if data == "wikitext2_char":
        refused = data_root / "wikitext-2" / "train.txt"
    else:
        write_multi30k(tmp_path / "data")
        refused = tmp_path / "data" / "multi30k" / "test_2016_flickr.en"
        extra = [f"data={data}", "model=mha", "task.max_len=31", f"data.root={tmp_path / 'data'}"]
    real = builtins.open

    def refuse(path, *args, **kwargs):
        if Path(str(path)) == refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    assert_one_line_error(
        cli(*extra),
        [f"data file {refused} cannot be read (Permission denied)", "data.root"],
        tmp_path,
    )
    assert not (tmp_path / "run").exists()


# --- refused before the run folder is written -----------------------------------------------------

# (damage(data root), words the error line holds): found by the precheck, before Hydra starts
DATA_FILES = {
    "missing split file": (
        lambda root: (root / "wikitext-2" / "valid.txt").unlink(),
        ["data.root: missing file", "wikitext-2/valid.txt", "wikitext-2/{train.txt,valid.txt,"],
    ),
    "missing corpus folder": (
        lambda root: shutil.rmtree(root / "wikitext-2"),
        ["data.root: missing file", "wikitext-2/train.txt", "(data.root)"],
    ),
    "a folder in a file's place": (
        lambda root: [
            (root / "wikitext-2" / "test.txt").unlink(),
            (root / "wikitext-2" / "test.txt").mkdir(),
        ],
        ["data.root: missing file", "wikitext-2/test.txt"],
    ),
    "empty file": (
        lambda root: (root / "wikitext-2" / "test.txt").write_bytes(b""),
        ["wikitext-2/test.txt is empty"],
    ),
    "translation missing file": (
        lambda root: (root / "multi30k" / "val.de").unlink(),
        ["data.root: missing file", "multi30k/val.de", "multi30k/{train,val,test_2016_flickr}"],
    ),
}


def data_copy(data_root: Path, tmp_path: Path) -> Path:
    """A data root of the tests' WikiText-2 and a small Multi30k, to damage."""
    root = tmp_path / "data"
    shutil.copytree(data_root / "wikitext-2", root / "wikitext-2")
    write_multi30k(root)
    return root


@pytest.mark.parametrize("case", list(DATA_FILES))
def test_missing_data_files_are_refused_before_the_run_folder(cli, data_root, tmp_path, case):
    damage, words = DATA_FILES[case]
    root = data_copy(data_root, tmp_path)
    damage(root)
    translation = case.startswith("translation")
    extra = ["data=multi30k_en_de", "model=mha", "task.max_len=31"] if translation else []
    result = cli(*extra, f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}")
    assert_one_line_error(result, words, tmp_path)
    assert not (tmp_path / "run").exists()  # Hydra never started: no .hydra/, no train.log


def test_a_multirun_checks_the_data_files_of_each_value(data_root, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "no-data"
    empty.mkdir()
    sweep = tmp_path / "sweep"
    command = ["-m", "debug=tiny", f"data.root={data_root},{empty}", f"hydra.sweep.dir={sweep}"]
    assert_error_line(
        run_main(command, monkeypatch, capsys),
        ["data.root: missing file", f"{empty / 'wikitext-2' / 'train.txt'}"],
    )
    assert not sweep.exists()  # before any job


def test_a_refusal_after_hydra_started_removes_the_folder_it_made(cli, data_root, tmp_path):
    """A data file found bad only when the data is built (a split of white space): the run folder,
    made for this run, held only .hydra/ and train.log, as if a run had been there."""
    root = data_copy(data_root, tmp_path)
    (root / "wikitext-2" / "valid.txt").write_text("\n \n\n")
    result = cli(f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}")
    assert_one_line_error(result, ["data split 'val' is empty"], tmp_path)
    assert not (tmp_path / "run").exists()


def everything(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_refusal_keeps_the_folders_that_existed(cli, data_root, tmp_path):
    """A run folder of an earlier run keeps its checkpoints and metrics; an empty folder given as
    hydra.run.dir stays too: only a folder this run made goes."""
    root = data_copy(data_root, tmp_path)
    (root / "wikitext-2" / "valid.txt").write_text("\n \n\n")
    bad = (f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}")
    run = tmp_path / "run"
    assert cli("model=mha", "trainer.max_steps=5")[0] == 0
    before = {k: v for k, v in everything(run).items() if k.startswith(("checkpoints", "metrics"))}
    assert_error_line(cli("model=mha", "trainer.max_steps=10", *bad), ["data split 'val' is empty"])
    assert {k: v for k, v in everything(run).items() if k in before} == before
    given = tmp_path / "given"
    given.mkdir()
    assert_error_line(cli(f"hydra.run.dir={given}", *bad), ["data split 'val' is empty"])
    assert given.is_dir()


def test_eval_only_checks_the_data_files_of_the_run(cli, data_root, tmp_path):
    """trainer.eval_only evaluates on the run's own data: its files are checked before RUN/eval/ is
    made, and the data config of the command line (the default wikitext2_char here) is not."""
    root = data_copy(data_root, tmp_path)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    run = tmp_path / "run"
    assert cli("model=mha", "trainer.max_steps=2", f"data.root={root}", cache)[0] == 0
    (root / "wikitext-2" / "valid.txt").unlink()
    result = cli("trainer.eval_only=true", f"data.root={root}", cache)
    assert_error_line(result, ["data.root: missing file", "wikitext-2/valid.txt"])
    assert not (run / "eval").exists()
    other = tmp_path / "random"
    tokens = ("model=mha", "data=random_tokens", "data.vocab_size=64")
    assert cli(*tokens, "trainer.max_steps=2", f"hydra.run.dir={other}")[0] == 0
    evaluated = cli("trainer.eval_only=true", f"hydra.run.dir={other}", f"data.root={tmp_path}")
    assert evaluated[0] == 0, evaluated[
        1
    ]  # no wikitext-2/ under data.root: random_tokens needs none


# --- a full disk while Hydra writes the run folder's .hydra/ --------------------------------------


def full_disk_for(monkeypatch, folder: Path, name: str) -> None:
    """Every write to the file `name` in `folder` (or to its temp file) fails as on a full disk,
    whoever opens it: Hydra's own writer opens it with the builtin open()."""
    import builtins

    real = builtins.open

    def fake_open(path, mode="r", *args, **kwargs):
        file = real(path, mode, *args, **kwargs)
        meant = Path(str(path)).parent == folder and name in Path(str(path)).name
        return FullDisk(file, 1) if meant and ("w" in mode or "a" in mode) else file

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("name", ["config.yaml", "hydra.yaml", "overrides.yaml"])
def test_full_disk_while_hydra_writes_the_run_config_is_one_line(cli, tmp_path, monkeypatch, name):
    run = tmp_path / "run"
    full_disk_for(monkeypatch, run / ".hydra", name)
    assert_one_line_error(
        cli(),
        [
            f"{run / '.hydra' / name} could not be written (No space left on device)",
            f"free space there, then resume: the same command with hydra.run.dir={run}",
        ],
        tmp_path,
    )
    assert not run.exists()  # made for this run, which never started


def test_full_disk_while_hydra_writes_a_resumed_run_config_loses_nothing(
    cli, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    assert cli("model=mha", "trainer.max_steps=5")[0] == 0
    before = everything(run)
    with monkeypatch.context() as mp:
        full_disk_for(mp, run / ".hydra", "config.yaml")
        result = cli("model=mha", "trainer.max_steps=10")
    assert_error_line(result, [f"{run / '.hydra' / 'config.yaml'} could not be written"])
    assert everything(run) == before  # the earlier config.yaml whole, not cut short
    assert cli("model=mha", "trainer.max_steps=10")[0] == 0  # space freed: the same command


def test_full_disk_while_hydra_writes_a_job_config_stops_the_multirun(
    tmp_path, monkeypatch, capsys
):
    job = tmp_path / "sweep" / "0"
    full_disk_for(monkeypatch, job / ".hydra", "config.yaml")
    command = ["-m", "debug=tiny", "trainer.device=cpu", f"hydra.sweep.dir={tmp_path}/sweep"]
    assert_error_line(
        run_main(command, monkeypatch, capsys),
        [
            f"{job / '.hydra' / 'config.yaml'} could not be written (No space left on device)",
            "free space there; the multirun stops at job 0",
        ],
    )


def test_full_disk_while_taking_the_run_lock_is_one_line(cli, tmp_path, monkeypatch):
    import os

    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        file = real(fd, mode, *args, **kwargs)
        lock = os.readlink(f"/proc/self/fd/{fd}").endswith("train.lock")
        return FullDisk(file, 1) if lock and "w" in mode else file

    monkeypatch.setattr(os, "fdopen", fdopen)
    run = tmp_path / "run"
    assert_one_line_error(
        cli(), [f"{run / 'train.lock'} could not be written (No space left on device)"], tmp_path
    )
    assert not run.exists()


class FullWandbRun:
    """wandb's run, as its Python side fails on a full disk: the `nth` log raises the OSError that
    wandb's copy of a media file into RUN/wandb/ raised (shutil.move); finish() is recorded."""

    id = "full-disk"

    def __init__(self, folder: Path, nth: int):
        self.folder, self.nth, self.logs, self.finished = folder, nth, 0, False

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.logs += 1
        if self.logs >= self.nth:
            raise OSError(*NO_SPACE, str(self.folder / "files" / "media" / "chart.png"))

    def finish(self) -> None:
        self.finished = True


@pytest.mark.parametrize("nth", [0, 8], ids=["init", "log"])
def test_full_disk_in_wandb_is_one_line(cli, tmp_path, monkeypatch, nth):
    wandb = pytest.importorskip("wandb")
    run = tmp_path / "run"
    wandb_run = FullWandbRun(run / "wandb", nth)

    def init(**kwargs):
        if nth == 0:  # wandb.init makes the run's folders and settings files
            raise OSError(*NO_SPACE, str(run / "wandb"))
        return wandb_run

    monkeypatch.setattr(wandb, "init", init)
    result = cli(*TEN, "logger=wandb", "logger.wandb.mode=offline")
    assert_error_line(result, [f"{run / 'wandb'} could not be written (No space left on device)"])
    if nth:  # step 7's log: step 5's checkpoint and the metrics lines kept, the W&B run finished
        assert_kept(run, 5)
        assert wandb_run.finished
    else:  # nothing trained: the folder made for the run is gone
        assert not run.exists()


def test_wandb_network_errors_stay_its_own(tmp_path):
    """Only a disk's errors become a WriteError: wandb's network ones are OSErrors too."""
    from moa_train.metrics.sinks import DISK_ERRORS, writing

    with pytest.raises(ConnectionRefusedError), writing(tmp_path, DISK_ERRORS):
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
