"""Bad input through the command-line entry point, in-process: each case ends with exit code 2 and
one `error:` line naming the key (or the file and line) and what is allowed, no traceback, and no
training."""

from __future__ import annotations

import errno
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl

# (overrides on top of debug=tiny, words the error line holds)
OVERRIDES = {
    "unknown model": ("model=foo", ["model=foo: no such config", "allowed: gqa, mae, mha, "]),
    "unknown data": ("data=wikitext3", ["data=wikitext3: no such config", "wikitext2_char"]),
    "unknown key": ("model.foo=1", ["model.foo"]),
    "misspelt key": ("trainer.max_stepz=5", ["trainer.max_stepz"]),
    "unknown top-level key": ("foo=1", ["foo"]),
    "int as text": ("trainer.max_steps=abc", ["trainer.max_steps", "abc"]),
    "float as text": ("optim.lr=fast", ["optim.lr", "fast"]),
    "bool as text": ("trainer.compile=maybe", ["trainer.compile", "maybe"]),
    "heads not dividing d_model": (
        "model.n_head=5",
        ["model.n_head: 5 does not divide", "valid: 1, 2, 4, 8, 16, 32"],
    ),
    "kv heads not dividing heads": (
        "model=gqa model.n_kv_heads=3",
        ["model.n_kv_heads: 3", "valid: 1, 2"],
    ),
    "key of another variant": (
        "model=mha model.n_experts=16",
        [
            (
                "model.n_experts: belongs to moa (and its presets moa_dense, moa_sparse), "
                "switchhead, not mha"
            )
        ],
    ),
    "zero kv heads": ("model=mha model.n_kv_heads=0", ["model.n_kv_heads", "valid: 1, 2"]),
    "negative moa kv groups": (
        "model=moa model.n_kv_heads=-1",
        ["model.n_kv_heads", "positive or null"],
    ),
    "top_k above n_experts": ("model=moa model.top_k=9", ["model.top_k: 9", "valid: 1..4"]),
    "moas gqa heads": (
        "model=moas_dynamic model.gqa_kv_heads=4",
        ["model.gqa_kv_heads", "valid: 1, 2"],
    ),
    "moas residual dropout mode": (
        "model=moas_static model.resid_dropout=foo",
        ["model.resid_dropout: got 'foo'; allowed: mixed, per_branch"],
    ),
    "zero d_model": ("model.d_model=0", ["model.d_model", "positive"]),
    "dropout of 1.5": ("model.dropout=1.5", ["model.dropout", "[0, 1)"]),
    "block over max_seq_len": ("trainer.block_size=64", ["trainer.block_size: 64", "valid: 1..32"]),
    "zero lr": ("optim.lr=0", ["optim.lr", "positive"]),
    "negative lr": ("optim.lr=-0.001", ["optim.lr", "positive"]),
    "zero eps": ("optim.eps=0", ["optim.eps", "positive"]),
    "infinite lr": ("optim.lr=inf", ["optim.lr", "finite"]),
    "NaN lr": ("optim.lr=nan", ["optim.lr", "finite"]),
    "infinite weight decay": ("optim.weight_decay=inf", ["optim.weight_decay", "finite"]),
    "infinite router lr multiplier": (
        "optim.router_lr_mult=inf",
        ["optim.router_lr_mult", "finite"],
    ),
    "infinite eps": ("optim.eps=inf", ["optim.eps", "finite"]),
    "NaN balance coefficient": ("model.aux.balance_coef=nan", ["model.aux.balance_coef", "finite"]),
    "NaN z coefficient": ("model.aux.z_coef=nan", ["model.aux.z_coef", "finite"]),
    "negative cv coefficient": ("model.aux.cv_coef=-1", ["model.aux.cv_coef", ">= 0"]),
    "infinite grad clip": ("trainer.grad_clip=inf", ["trainer.grad_clip", "finite"]),
    "NaN beta": ("optim.betas=[0.9,nan]", ["optim.betas.1", "finite"]),
    "beta of 1.5": ("optim.betas=[0.9,1.5]", ["optim.betas", "[0, 1)"]),
    "zero batch": ("trainer.batch_size=0", ["trainer.batch_size", "positive"]),
    "negative batch": ("trainer.batch_size=-4", ["trainer.batch_size", "positive"]),
    "zero steps": ("trainer.max_steps=0", ["trainer.max_steps", "positive"]),
    "negative steps": ("trainer.max_steps=-10", ["trainer.max_steps", "positive"]),
    "accum not dividing batch": ("trainer.grad_accum=3", ["trainer.grad_accum", "valid: 1, 2, 4"]),
    "zero eval interval": ("trainer.eval_interval=0", ["trainer.eval_interval", "positive"]),
    "zero eval iters": ("trainer.eval_iters=0", ["trainer.eval_iters", "positive or null"]),
    "zero eval batch": (
        "trainer.eval_batch_size=0",
        ["trainer.eval_batch_size", "positive or null"],
    ),
    "zero save interval": (
        "trainer.save_interval=0",
        ["trainer.save_interval", "positive or null"],
    ),
    "negative grad clip": ("trainer.grad_clip=-1", ["trainer.grad_clip", "positive or null"]),
    "no checkpoints kept": ("trainer.keep_checkpoints=0", ["trainer.keep_checkpoints", ">= 1"]),
    "zero max_bad_steps": ("trainer.max_bad_steps=0", ["trainer.max_bad_steps", ">= 1"]),
    "max_time in another format": (
        "trainer.max_time=1h30m",
        ["trainer.max_time", "got '1h30m'", "seconds (5400) or DD:HH:MM:SS"],
    ),
    "zero max_time": ("trainer.max_time=0", ["trainer.max_time", "got 0", "positive"]),
    "negative patience": (
        "trainer.early_stopping.patience=-1",
        ["trainer.early_stopping.patience", ">= 0"],
    ),
    "negative min_delta": (
        "trainer.early_stopping.min_delta=-0.1",
        ["trainer.early_stopping.min_delta", ">= 0"],
    ),
    "fp32 grouped MoA in a CUDA graph": (
        "model=moa model.expert_matmul=grouped trainer.cuda_graphs=true",
        ["model.expert_matmul", "use auto, dense"],
    ),
    "zero DDP bucket": ("trainer.ddp_bucket_mb=0", ["trainer.ddp_bucket_mb", "> 0"]),
    "label smoothing of 1": (
        "data=multi30k_en_de task.label_smoothing=1.0",
        ["task.label_smoothing", "[0, 1)"],
    ),
    "unknown device": ("trainer.device=tpu", ["trainer.device", "auto, cpu, cuda"]),
    "unknown precision": ("trainer.precision=fp8", ["trainer.precision", "fp32, bf16"]),
    "unknown schedule": (
        "schedule.name=linear",
        ["schedule.name", "constant, cosine, inverse_sqrt"],
    ),
    "negative warmup": ("schedule.warmup_steps=-1", ["schedule.warmup_steps", ">= 0"]),
    "unknown balance loss": (
        "model.aux.balance_type=foo",
        ["model.aux.balance_type", "mse, switch"],
    ),
    "tiny BPE vocabulary": (
        "data=wikitext2_bpe data.vocab_size=100",
        ["data.vocab_size", ">= 260"],
    ),
    "unfused optimizer in a CUDA graph": (
        "trainer.cuda_graphs=true optim.fused=false",
        ["optim.fused", "use true"],
    ),
    "eval_only without a checkpoint": (
        "trainer.eval_only=true trainer.resume=false",
        ["trainer.eval_only"],
    ),
    "resume from nowhere": (
        "trainer.resume=/nonexistent/run",
        ["trainer.resume", "does not exist"],
    ),
    "no data folder": ("data.root=/nonexistent/folder", ["data.root", "MOA_DATA_DIR"]),
    "run folder under a file": ("hydra.run.dir={file}/run", ["hydra.run.dir", "is a file"]),
    "cache folder under a file": ("data.cache_dir={file}/cache", ["data.cache_dir", "is a file"]),
    "zero-width MLP": ("model.mlp_ratio=0.001", ["model.mlp_ratio", "at least 1 unit"]),
    "infinite MLP": ("model.mlp_ratio=inf", ["model.mlp_ratio", "finite"]),
    "negative seed": ("trainer.seed=-1", ["trainer.seed", "0..4294967295"]),
    "unknown compile backend": (
        "trainer.compile_backend=foo",
        ["trainer.compile_backend", "inductor, ", "aot_eager"],
    ),
    "task that does not fit the data": (
        "task=lm data=multi30k_en_de",
        ["task: lm does not fit data=multi30k_en_de", "use task=translation"],
    ),
    "unknown task": ("task=ner", ["task=ner: no such config", "lm, mlm, translation"]),
    "huge beam": (
        "model=mha data=multi30k_en_de task.max_len=8 task.beam=100000",
        ["task.beam", "1..64"],
    ),
    "huge val beam": (
        "model=mha data=multi30k_en_de task.max_len=8 task.val_beam=1000",
        ["task.val_beam", "1..64"],
    ),
    "NaN length penalty": (
        "model=mha data=multi30k_en_de task.max_len=8 task.lenpen=nan",
        ["task.lenpen", "finite"],
    ),
    "negative max_len_a": (
        "model=mha data=multi30k_en_de task.max_len=8 task.max_len_a=-1",
        ["task.max_len_a", ">= 0"],
    ),
    "empty run folder": ("hydra.run.dir=", ["hydra.run.dir: empty"]),
    "experiment name leaving outputs": (
        "experiment_name=../../x",
        ["experiment_name", "without '..'"],
    ),
    "absolute experiment name": ("experiment_name=/tmp/x", ["experiment_name", "relative"]),
    "unknown nested experiment": (
        "experiment=unknown/x",
        ["experiment=unknown/x: no such config", "moas_table1/mha, ", "quickstart"],
    ),
    "non-ASCII digits": ("trainer.seed=١٢", ["trainer.seed", "non-ASCII digits", "0-9"]),
    "unquoted non-ASCII path": (
        "data.root=/tmp/é",
        ["data.root", "must be quoted", "data.root='/tmp/é'"],
    ),
    "batch that cannot fit": (
        "trainer.batch_size=100000000",
        ["trainer.batch_size: ", "needs at least", "raise trainer.grad_accum"],
    ),
    "model that cannot fit": (
        "model.d_model=1000000",
        ["model.d_model", "weights and optimizer state"],
    ),
    "multirun: unknown model": (
        "-m model=mha,foo",
        ["model=foo: no such config", "allowed: gqa, mae, mha, "],
    ),
    "multirun: bad value in a sweep": (
        "-m trainer.max_steps=1,-1",
        ["trainer.max_steps", "positive"],
    ),
    "multirun: misspelt key": ("-m trainer.max_stepz=1,2", ["trainer.max_stepz"]),
    "multirun: choice sweep": ("-m model.dropout=choice(0.1,1.5)", ["model.dropout", "[0, 1)"]),
    "unreadable checkpoint": (
        "trainer.resume={file}",
        ["checkpoint", "not-a-checkpoint.pt cannot be read"],
    ),
}


def replace_line(path: Path, number: int, data: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = data
    path.write_bytes(b"\n".join(lines))


def write_multi30k(root: Path) -> None:
    folder = root / "multi30k"
    folder.mkdir(parents=True)
    for stem in ("train", "val", "test_2016_flickr"):
        (folder / f"{stem}.en").write_text(
            "".join(f"a dog runs {i} times\n" for i in range(20)), encoding="utf-8"
        )
        (folder / f"{stem}.de").write_text(
            "".join(f"ein Hund läuft {i} mal\n" for i in range(20)), encoding="utf-8"
        )


# (layout, damage(folder), words the error line holds)
DATA = {
    "missing split file": (
        "wikitext",
        lambda f: (f / "valid.txt").unlink(),
        ["data.root: missing file", "valid.txt"],
    ),
    "empty file": ("wikitext", lambda f: (f / "test.txt").write_bytes(b""), ["test.txt is empty"]),
    "blank split": (
        "wikitext",
        lambda f: (f / "valid.txt").write_text("\n \n\n"),
        ["data split 'val' is empty", "valid.txt holds only white space"],
    ),
    "not UTF-8": (
        "wikitext",
        lambda f: replace_line(f / "train.txt", 17, "café".encode("latin-1")),
        ["train.txt is not UTF-8 text (line 17)"],
    ),
    "character not in train": (
        "wikitext",
        lambda f: replace_line(f / "valid.txt", 3, "Ωmega".encode()),
        ["valid.txt, line 3: character 'Ω' is not in the train file's vocabulary"],
    ),
    "translation line counts": (
        "multi30k",
        lambda f: (f / "train.de").open("a").write("noch eine\n"),
        ["train.de (21 lines)", "train.en (20 lines)", "not parallel"],
    ),
    "translation not UTF-8": (
        "multi30k",
        lambda f: replace_line(f / "test_2016_flickr.de", 2, b"Gr\xfc\xdfe"),
        ["test_2016_flickr.de is not UTF-8 text (line 2)"],
    ),
    "translation empty split": (
        "multi30k",
        lambda f: [(f / f"val.{x}").write_text("\n\n") for x in ("en", "de")],
        ["data split 'val' is empty", "val.de holds no sentences"],
    ),
    "short valid split": (
        "wikitext",
        lambda f: (f / "valid.txt").write_text(" The game . \n"),
        ["data file", "valid.txt: the val split holds 13 tokens", "trainer.block_size=32"],
    ),
    # ~900 characters: 10% is short
    "short paper split": (
        "wikitext",
        lambda f: [
            (f / name).write_text(
                (f / "train.txt").read_text(encoding="utf-8").splitlines(keepends=True)[0],
                encoding="utf-8",
            )
            for name in ("train.txt", "test.txt")
        ],
        ["the last 10% of", "train.txt: the val split holds", "trainer.block_size=100"],
        "data.split=moas_paper model.max_seq_len=128 trainer.block_size=100",
    ),
    "translation missing file": (
        "multi30k",
        lambda f: (f / "val.de").unlink(),
        ["missing file", "val.de"],
    ),
}


def assert_error_line(result: tuple, words: list, code: int = 2) -> None:
    exit_code, output, err_lines = result
    assert exit_code == code, output
    assert "Traceback" not in output, output
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), output
    for word in words:
        assert word in err_lines[0], err_lines[0]


def assert_one_line_error(result: tuple, words: list, tmp_path: Path, code: int = 2) -> None:
    assert_error_line(result, words, code)
    assert not [p for p in tmp_path.rglob("step_*.pt") if p.is_file()]  # stopped before training
    if code == 2:  # bad input: found before any step (a diverged run, code 3, has logged its steps)
        assert not any(
            p.is_file() and p.read_text().strip() for p in tmp_path.rglob("metrics.jsonl")
        )


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_bad_override(cli, tmp_path, case):
    overrides, words = OVERRIDES[case]
    a_file = tmp_path / "not-a-checkpoint.pt"
    a_file.write_text("not a checkpoint")
    assert_one_line_error(cli(*overrides.format(file=a_file).split()), words, tmp_path)
    if case != "unreadable checkpoint":  # found when the run opens it
        assert not (tmp_path / "run").exists()  # found before Hydra creates the run folder


def test_hydra_overrides_reach_the_precheck(tmp_path):
    """hydra.searchpath adds config folders: an experiment there is valid (the precheck used to drop
    hydra.*)."""
    from moa_train.cli import precheck

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ntrainer:\n  max_steps: 3\n"
    )
    precheck(
        [
            "debug=tiny",
            f"hydra.searchpath=[file://{tmp_path}]",
            "experiment=mine",
            f"hydra.run.dir={tmp_path}/run",
        ]
    )  # no SystemExit


@pytest.mark.parametrize("case", list(DATA))
def test_bad_data_file(cli, data_root, tmp_path, case):
    layout, damage, words, *more = DATA[case]
    root = tmp_path / "data"
    if layout == "wikitext":
        shutil.copytree(data_root / "wikitext-2", root / "wikitext-2")
        extra = []
    else:
        write_multi30k(root)
        extra = ["data=multi30k_en_de", "model=mha", "task.max_len=31"]
    damage(root / ("wikitext-2" if layout == "wikitext" else "multi30k"))
    result = cli(
        *extra, *" ".join(more).split(), f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"
    )
    assert_one_line_error(result, words, tmp_path)


def test_diverging_run_exits_3(cli, tmp_path, monkeypatch):
    from moa_train.train.tasks import LMTask

    original = LMTask.loss

    def nan_loss(self, model, batch, all_aux):
        total, *rest = original(self, model, batch, all_aux)
        return (total * float("nan"), *rest)

    monkeypatch.setattr(LMTask, "loss", nan_loss)
    result = cli("model=mha", "trainer.max_bad_steps=2", "trainer.log_interval=1")
    assert_one_line_error(
        result, ["trainer.max_bad_steps: 2 steps in a row", "stopped at step 2"], tmp_path, code=3
    )


# --- checkpoints, the run-folder lock, a full disk: nothing lost, nothing created -----------------

BASE = ("model=mha", "trainer.eval_interval=5", "trainer.log_interval=1")
FIVE, TEN = (*BASE, "trainer.max_steps=5"), (*BASE, "trainer.max_steps=10")


def folder_state(run: Path) -> dict:
    """Every checkpoint's bytes and metrics.jsonl's text: what an error must leave as it was."""
    files = [*run.glob("checkpoints/*"), run / "metrics.jsonl"]
    return {p.name: p.read_bytes() for p in files if p.is_file()}


def test_checkpoint_carrying_code_is_refused(cli, tmp_path):
    from moa_train.train.checkpoint import file_sha256, load_checkpoint, sidecar

    run = tmp_path / "run"
    assert cli(*FIVE)[0] == 0
    path = run / "checkpoints" / "step_0000005.pt"
    marker = tmp_path / "payload-ran"
    state = load_checkpoint(path)
    state["wandb_id"] = Payload(marker)
    torch.save(state, path)
    sidecar(path).write_text(f"{file_sha256(path)}  {path.name}\n")
    before = folder_state(run)
    result = cli(*TEN, f"trainer.resume={path}")
    assert_error_line(result, [str(path), "is refused: it names io.open", "not recommended"])
    assert "--trust-pickle" not in result[1]  # no advice to run it
    assert not marker.exists()
    assert folder_state(run) == before


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_second_trainer_on_a_run_folder_is_refused(cli, tmp_path):
    import socket

    run = tmp_path / "run"
    assert cli(*FIVE)[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "train.lock").write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname()})
        )
        before = folder_state(run), (run / ".hydra" / "overrides.yaml").read_bytes()
        assert_error_line(
            cli(*TEN), [f"hydra.run.dir: {run} is in use by process {holder.pid}", "train.lock"]
        )
        # Hydra's too
        assert (folder_state(run), (run / ".hydra" / "overrides.yaml").read_bytes()) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder has died (a SIGKILL leaves its lock): the next trainer takes the lock over, and
    # releases it
    assert cli(*TEN)[0] == 0
    assert not (run / "train.lock").exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r] == list(
        range(1, 11)
    )


def test_full_disk_during_a_save_is_one_error_and_keeps_the_previous_checkpoint(
    cli, tmp_path, monkeypatch
):
    import moa_train.io

    run = tmp_path / "run"
    assert cli(*FIVE)[0] == 0
    before = folder_state(run)

    class FullDisk(io.FileIO):
        """One write fails as on a full disk; later ones land (as in a buffer), so torch.save's own
        end-of-file check is what fails: a RuntimeError, whose cause is the OSError."""

        writes = 0

        def write(self, data):
            FullDisk.writes += 1
            if FullDisk.writes == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    real_open = open
    monkeypatch.setattr(
        moa_train.io,
        "open",
        lambda path, mode="r", *a, **k: (
            FullDisk(path, mode)
            if "w" in mode and ".step_" in str(path)
            else real_open(path, mode, *a, **k)
        ),
        raising=False,
    )
    result = cli(*TEN)
    assert_error_line(
        result,
        [
            str(run / "checkpoints" / "step_0000010.pt"),
            "could not be written",
            "No space left on device",
        ],
    )
    after = folder_state(run)
    assert {k: after[k] for k in before if k != "metrics.jsonl"} == {
        k: v for k, v in before.items() if k != "metrics.jsonl"
    }
    assert sorted(after) == sorted(before)  # no step file, sidecar or temp file created
    kept = [
        r for r in map(json.loads, before["metrics.jsonl"].splitlines()) if "test/loss" not in r
    ]
    # no line lost (the end-of-run test line is dropped by every resume: the resumed run writes its
    # own)
    assert read_jsonl(run / "metrics.jsonl")[: len(kept)] == kept
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r] == list(
        range(1, 11)
    )
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_resume_with_a_changed_architecture_is_refused(cli, tmp_path):
    run = tmp_path / "run"
    assert cli(*FIVE)[0] == 0
    before = folder_state(run)
    assert_error_line(
        cli(*TEN, "model.n_layer=3"),
        ["trainer.resume: model.n_layer is 2 in the checkpoint but 3 now"],
    )
    assert folder_state(run) == before


def test_wandb_logger_without_wandb_names_the_extra(cli, tmp_path, monkeypatch):
    # `import wandb` fails, as after a plain scripts/setup.sh
    monkeypatch.setitem(sys.modules, "wandb", None)
    result = cli("logger=wandb")
    assert_one_line_error(
        result, ["logger=wandb", "[wandb] extra", "pip install -e '.[wandb]'"], tmp_path
    )
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run folder


MULTIRUN = {  # (command line after debug=tiny, words the error line holds)
    "misspelt key in a multirun": ("-m model=mha,moa trainer.max_stepz=5", ["trainer.max_stepz"]),
    "unknown launcher in a multirun": (
        "-m model=mha,moa hydra/launcher=nonesuch",
        ["hydra/launcher=nonesuch: no such launcher", "basic", "[launchers]"],
    ),
    "unknown launcher": ("hydra/launcher=nonesuch", ["hydra/launcher=nonesuch", "[launchers]"]),
}


@pytest.mark.parametrize("case", list(MULTIRUN))
def test_bad_multirun_override(cli, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # where a multirun's default sweep folder would go
    command, words = MULTIRUN[case]
    assert_one_line_error(cli(*command.split()), words, tmp_path)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried "
            "to allocate 1099511627776 bytes."
        ),
        MemoryError(),
    ],
    ids=["cuda", "cpu", "numpy"],
)
def test_out_of_memory_in_the_first_step(cli, tmp_path, monkeypatch, error):
    from moa_train.train.tasks import LMTask

    def no_memory(self, model, batch, all_aux):
        raise error

    monkeypatch.setattr(LMTask, "loss", no_memory)
    assert_one_line_error(
        cli("model=mha"),
        [
            "trainer.batch_size: out of memory in the first training step",
            "trainer.block_size",
            "trainer.grad_accum",
        ],
        tmp_path,
    )


def test_other_errors_in_the_first_step_stay_bugs(cli, monkeypatch):
    from moa_train.train.tasks import LMTask

    def broken(self, model, batch, all_aux):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(LMTask, "loss", broken)
    code, output, _ = cli("model=mha")
    assert code == 1 and "Traceback" in output and "shapes cannot be multiplied" in output


def _unwritable(monkeypatch, name: str) -> None:
    """os.access says no for `name` (the tests run as root, for whom chmod changes nothing)."""
    import os

    real = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: Path(path).name != name and real(path, mode, **kw)
    )


# (prepare(run folder, monkeypatch), extra overrides, words the error line holds)
RUN_FOLDER = {
    "train.log is a folder": (
        lambda r, mp: (r / "train.log").mkdir(),
        "",
        ["hydra.run.dir", "train.log", "is not a file"],
    ),
    "metrics.jsonl is a folder": (
        lambda r, mp: (r / "metrics.jsonl").mkdir(),
        "",
        ["metrics.jsonl", "is not a file"],
    ),
    "unwritable metrics.jsonl": (
        lambda r, mp: ((r / "metrics.jsonl").write_text(""), _unwritable(mp, "metrics.jsonl")),
        "",
        ["hydra.run.dir: cannot write", "metrics.jsonl"],
    ),
    "unwritable train.log": (
        lambda r, mp: ((r / "train.log").write_text(""), _unwritable(mp, "train.log")),
        "",
        ["hydra.run.dir: cannot write", "train.log"],
    ),
    "TensorBoard folder is a file": (
        lambda r, mp: (r / "tensorboard").write_text(""),
        "logger=tensorboard",
        ["logger.tensorboard.log_dir", "is a file"],
    ),
    "unwritable TensorBoard folder": (
        lambda r, mp: ((r / "tensorboard").mkdir(), _unwritable(mp, "tensorboard")),
        "logger=tensorboard",
        ["logger.tensorboard.log_dir", "cannot write into"],
    ),
    "checkpoints is a file": (
        lambda r, mp: (r / "checkpoints").write_text(""),
        "",
        ["hydra.run.dir", "is a file"],
    ),
    "a folder where a checkpoint belongs": (
        lambda r, mp: (r / "checkpoints" / "step_0000010.pt").mkdir(parents=True),
        "",
        ["step_0000010.pt is a folder where a checkpoint file belongs"],
    ),
}


@pytest.mark.parametrize("case", list(RUN_FOLDER))
def test_run_folder_that_cannot_be_written(cli, tmp_path, monkeypatch, case):
    prepare, extra, words = RUN_FOLDER[case]
    run = tmp_path / "run"
    run.mkdir()
    prepare(run, monkeypatch)
    before = sorted(run.rglob("*"))
    assert_one_line_error(cli(*extra.split()), words, tmp_path)
    assert sorted(run.rglob("*")) == before  # nothing written into it


def test_multirun_precheck_leaves_glob_and_interval_sweeps_to_the_sweeper(tmp_path):
    from moa_train.cli import expanded, parse, precheck

    runs = expanded(
        parse(
            ["debug=tiny", "model=mha,moa", "trainer.seed=range(0,2)", "optim.lr=interval(0.1,1)"]
        )
    )
    assert sorted(" ".join(sorted(r)) for r in runs) == sorted(
        " ".join(sorted(["debug=tiny", *r]))
        for r in (
            ["model=mha", "trainer.seed=0"],
            ["model=moa", "trainer.seed=0"],
            ["model=mha", "trainer.seed=0"],
            ["model=mha", "trainer.seed=1"],
        )
    )
    precheck(
        [
            "debug=tiny",
            "data=glob(wikitext2_c*)",
            "optim.lr=interval(0.1,1)",
            f"hydra.sweep.dir={tmp_path}",
        ],
        multirun=True,
    )  # no SystemExit
