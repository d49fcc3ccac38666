"""What a person sees on a terminal: progress bars and log lines on separate lines, one banner and
one done line."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from conftest import REPO

BAR = re.compile(r"\d+%\||step/s|batch/s")  # the text of a tqdm bar (train, eval)
LOG = re.compile(r"\]\[(INFO|WARNING)\] - ")  # Hydra's console log format


def run_on_a_terminal(args: list, env: dict) -> str:
    """The command's stdout and stderr as a 120-column terminal receives them (bars are shown on a
    tty only)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command ended and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_bars_and_log_lines_do_not_share_a_line(tmp_path):
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MOA_CACHE_DIR": str(tmp_path / "cache"),
        "TERM": "xterm",
    }
    out = run_on_a_terminal(
        [
            sys.executable,
            "-m",
            "moa_train",
            "debug=tiny",
            "model=moa",
            "trainer.device=cpu",
            "trainer.max_steps=12",
            "trainer.log_interval=2",
            "trainer.eval_interval=6",
            f"hydra.run.dir={run_dir}",
        ],
        env,
    )
    # what a terminal shows between \r and \n
    segments = [s for s in re.split(r"[\r\n]", out) if s.strip()]
    # the bars were drawn: the check below means something
    assert any(BAR.search(s) for s in segments), out
    logs = [s for s in segments if LOG.search(s)]
    assert len(logs) >= 7, out  # banner, 6 train lines, 2 val lines, done
    glued = [s for s in logs if BAR.search(s)]
    assert not glued, "\n".join(glued)
    banner = [s for s in logs if "] - run: " in s]
    assert len(banner) == 1 and logs[0] == banner[0], out
    for field in ("model moa", "parameters", "device cpu", f"run folder {run_dir}"):
        assert field in banner[0], banner[0]
    done = [s for s in logs if "] - done: " in s]
    assert len(done) == 1 and logs[-1] == done[0], out
    for field in ("val/loss ", "test/loss ", " s |", f"run folder {run_dir}"):
        assert field in done[0], done[0]
