"""Every command line the README and the docs/ pages (docs/*.md; results/ left out) show runs as
written (with tiny step counts added), except those they mark `[GPU]`, `[multi-node]`, `[full run]`
(a paper's whole reproduction) or `[SLURM]` (a cluster's scheduler). The lines of one section (a
page's `## ` heading) run in order in one fresh folder, so a later line can use what an earlier one
made (a run folder, a sweep)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_main, write_wikitext

MARKERS = ("[GPU]", "[multi-node]", "[full run]", "[SLURM]")
# added to every training command: a couple of steps, one evaluation batch, a few decoded sentences
TINY = (
    "trainer.max_steps=2",
    "trainer.eval_interval=2",
    "trainer.eval_iters=1",
    "trainer.log_interval=1",
    "trainer.device=cpu",
)
# added to translation commands: a few decoded sentences, small steps (translation's own keys)
TINY_TRANSLATION = ("task.max_sentences=2", "task.max_tokens=512")
TRANSLATION = re.compile(
    r"^(task=translation|data=(multi30k|wmt14)\w*|experiment=(multi30k|moa_wmt)\w*/.*)$"
)


def tiny(args: list) -> list:
    """TINY, and translation's sizes where the command makes a translation run."""
    return [*TINY, *(TINY_TRANSLATION if any(TRANSLATION.match(a) for a in args) else ())]


ENTRY = {
    "moa-train": "moa_train",
    "moa-report": "moa_train.report",
    "moa-bench": "moa_train.bench",
    "moa-generate": "moa_train.generation",
}


PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_commands() -> dict:
    """{"page: section heading": [(command line, its comment)]} of the bash blocks of the README and
    the docs/ pages, continuations joined."""
    sections, heading, block = {}, None, False
    for page in PAGES:
        heading = f"{page.relative_to(REPO)}"
        lines = page.read_text(encoding="utf-8").replace("\\\n", " ").splitlines()
        for line in lines:
            if line.startswith("## "):
                heading = f"{page.relative_to(REPO)}: {line[3:].strip()}"
            elif line.startswith("```"):
                block = line.strip() == "```bash"
            elif block and line.strip() and not line.lstrip().startswith("#"):
                command, _, comment = line.partition(" # ")
                sections.setdefault(heading, []).append((command.strip(), comment.strip()))
    return sections


SECTIONS = readme_commands()


def test_the_readme_shows_commands_and_marks_only_known_kinds():
    assert sum(map(len, SECTIONS.values())) >= 20
    for lines in SECTIONS.values():
        for _, comment in lines:
            assert not re.search(r"\[[^\]]*\]$", comment) or comment.endswith(MARKERS), comment


def test_ci_runs_the_readmes_test_command():
    """.ci/run's command is the README's test command, style checks included."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    shown = [c for lines in SECTIONS.values() for c, _ in lines if "pytest" in c]
    assert ci in shown
    assert "ruff format --check ." in ci and "ruff check ." in ci


def write_multi30k(root: Path) -> None:
    folder = root / "multi30k"
    folder.mkdir(parents=True)
    words = [
        "a",
        "dog",
        "cat",
        "runs",
        "jumps",
        "over",
        "the",
        "red",
        "blue",
        "house",
        "man",
        "woman",
        "street",
    ]
    for stem, n in (("train", 200), ("val", 20), ("test_2016_flickr", 20)):
        lines = [
            " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 5))
            for i in range(n)
        ]
        for lang in ("en", "de"):
            (folder / f"{stem}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def readme_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme_data")
    write_wikitext(root)
    write_multi30k(root)
    return root


def argv_of(command: str) -> tuple:
    """(program, arguments) of a README line: set-up before `&&` and environment assignments left
    out (the test has its own set-up and data folder)."""
    command = command.rpartition("&& ")[2]
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        words.pop(0)
    if words[:2] == ["python3", "-m"]:
        return words[2], words[3:]
    if words[0] == "python3":
        return words[1], words[2:]
    return ENTRY.get(words[0], words[0]), words[1:]


def run_line(command: str, cwd: Path, monkeypatch, capsys) -> None:
    program, args = argv_of(command)
    args = [
        str(next(cwd.glob(a.replace("<date_time>", "*")), a)) if "<date_time>" in a else a
        for a in args
    ]
    if program == "moa_train":
        extra = tiny(args) + (
            ["hydra.sweeper.n_trials=2"] if any("hparams_search" in a for a in args) else []
        )
        # run folders are named to the second: two commands of a section started within one second
        # would share one (the second resuming the first), which a person typing them never sees
        time.sleep(1.0 - time.time() % 1.0 + 0.01)
        code, output, _ = run_main(args + extra, monkeypatch, capsys)
        assert code in (0, None), f"{command}\n{output}"
        return
    # rebuilt here, not over the committed files
    if "--tables-only" in args or "--paper-tables" in args:
        args += ["--out", str(cwd / "rebuilt")]
    elif program == "moa_train.report" and "--out" not in args:
        args += ["--out", str(cwd / "report")]
    if program == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", *args, *tiny(args)]
    elif program.endswith(".py"):
        cmd = [sys.executable, str(REPO / program), *args]
    else:
        cmd = [sys.executable, "-m", program, *args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{command}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "section",
    [
        pytest.param(name, marks=pytest.mark.distributed)
        if any(c.startswith("torchrun") for c, _ in lines)
        else name
        for name, lines in SECTIONS.items()
    ],
)
def test_readme_commands_run_as_written(section, readme_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOA_DATA_DIR", str(readme_data))
    monkeypatch.chdir(tmp_path)
    ran = 0
    for command, comment in SECTIONS[section]:
        if comment.endswith(MARKERS) or "pytest" in command:  # marked, or this suite itself
            continue
        run_line(command, tmp_path, monkeypatch, capsys)
        ran += 1
    if not ran:
        pytest.skip(f"every command of '{section}' is marked {', '.join(MARKERS)}")
