"""Checkpoints: written atomically (temp file, fsync, rename) with a sha256 sidecar, the last N kept
plus best.pt; verified on load, and a resume falls back from a damaged checkpoint to the newest one
that reads.

`step_0000020.pt.sha256` holds the hash in `sha256sum` format (`sha256sum -c` checks it by hand). A
checkpoint is renamed into place before its sidecar is written, and a stale sidecar is removed
first, so a crash between the two leaves a checkpoint without a sidecar (loaded unverified, with a
warning), never one with a wrong hash.

Loading runs no code: torch.load(weights_only=True) accepts tensors and plain types only, so every
state in a checkpoint is stored as those (the NumPy RNG state as a tensor). A file that names any
other global is refused in one line naming that global. Files written before that hold NumPy
objects only (OLD_FORMAT) and are refused with the command that converts them once (`python3 -m
moa_train.train.checkpoint convert PATH --trust-pickle`); any other global gets no such advice, and
convert refuses it too: it reads the NumPy objects of the old format and nothing else, and only a
file whose sidecar matches (or that has none).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import random
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from moa_train.config_format import upgrade_checkpoint
from moa_train.io import atomic_write, temp_path

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    pass


class UnsafeCheckpointError(CheckpointError):
    """A file that only a full unpickler reads (an old checkpoint, or one carrying code): never
    loaded."""


CONVERT = "python3 -m moa_train.train.checkpoint convert {path} --trust-pickle"

# What moa_train's checkpoints held before they stored tensors and plain values only: the NumPy RNG
# state's key array (np.random.get_state()), pickled by NumPy 1 (numpy.core) or 2 (numpy._core). The
# NumPy objects of no other kind: a uint32 array is all the old trainer wrote.
_reconstruct = np.zeros(0).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
OLD_FORMAT = {
    "numpy.core.multiarray._reconstruct": _reconstruct,
    "numpy._core.multiarray._reconstruct": _reconstruct,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
}
# the dtype's class is built (not named) by such a pickle: allowed for that alone
_OLD_FORMAT_TYPES = [type(np.dtype(np.uint32))]


def _numpy_rng_state(state=None) -> tuple:
    """np.random.get_state() (or `state`) with its key array as a tensor: a weights_only load
    accepts no NumPy arrays."""
    name, keys, pos, has_gauss, gauss = np.random.get_state() if state is None else state
    return (
        str(name),
        torch.from_numpy(np.asarray(keys).astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(gauss),
    )


def rng_state() -> dict:
    """This process's generators; of CUDA only the current device's (one per process: reading every
    GPU's would open a context on each GPU from every torchrun process)."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_rng_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys.cpu(), dtype=np.uint32), pos, has_gauss, gauss))
    # .cpu(): a checkpoint loaded onto the GPU moved these too
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# --- writing --------------------------------------------------------------------------------------


class _HashingWriter:
    """The file object torch.save writes to: hashes the bytes on their way out, so no second read is
    needed."""

    def __init__(self, file):
        self.file, self.sha, self.error = file, hashlib.sha256(), None

    def write(self, data) -> int:
        self.sha.update(data)
        try:
            return self.file.write(data)
        # torch.save reports it as a RuntimeError ("file write failed"): keep the cause
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_sidecar(path: Path, digest: str) -> None:
    atomic_write(
        sidecar(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()), durable=True
    )


def atomic_save(obj: dict, path: Path) -> str:
    """torch.save `obj` to `path` atomically, then its sha256 sidecar; returns the hash."""
    sidecar(path).unlink(missing_ok=True)
    hashing = {}

    def write(f):
        hashing["writer"] = _HashingWriter(f)
        try:
            torch.save(obj, hashing["writer"])
        except RuntimeError:
            if hashing["writer"].error is None:
                raise
            raise hashing["writer"].error from None  # a full disk is the user's to fix, not a bug

    atomic_write(path, write, durable=True)
    digest = hashing["writer"].sha.hexdigest()
    _write_sidecar(path, digest)
    return digest


def _publish_copy(src: Path, dst: Path, digest: str) -> None:
    """`dst` as a second name of `src` (a hard link: no second write), with its sidecar."""
    sidecar(dst).unlink(missing_ok=True)
    tmp = temp_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # a file system without hard links: a copy
        with open(src, "rb") as f:
            atomic_write(dst, lambda out: shutil.copyfileobj(f, out), durable=True)
    else:
        tmp.replace(dst)
    _write_sidecar(dst, digest)


def step_checkpoints(folder: Path) -> list:
    """step_*.pt files, oldest first."""
    return sorted(folder.glob("step_*.pt"))


def remove_temp_files(folder: Path) -> None:
    """Temp files of saves a kill interrupted (each as large as a checkpoint). Called by the one
    process that holds the run folder's lock, so no save of another process is under way."""
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
        log.warning("removing %s, left by an interrupted save", tmp)
        tmp.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


def save_checkpoint(
    state: dict, folder: Path, keep: int, is_best: bool, protect: Path | None = None
) -> Path:
    """step_NNNNNNN.pt (and best.pt); then only the last `keep` step files remain, and `protect`
    (an absolute path: the run's recovery point)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:07d}.pt"
    try:
        digest = atomic_save(state, path)
        if is_best:
            _publish_copy(path, folder / "best.pt", digest)
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {path} could not be written ({exc.strerror or exc}); free space in "
            f"{folder} or point hydra.run.dir elsewhere, then resume"
        ) from None
    for old in step_checkpoints(folder)[:-keep]:
        if old.absolute() != protect:
            _remove(old)
    return path


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that failed its check (and its sidecar) out of the resume's way, never
    delete it: the fault may be the sidecar's alone, and the file the only copy of that step."""
    kept = path.with_name(path.name + ".failed")
    path.replace(kept)
    if sidecar(path).is_file():
        sidecar(path).replace(sidecar(kept))
    return kept


def drop_later_checkpoints(folder: Path, step: int, failed: tuple = ()) -> None:
    """Remove the step files after `step`: a run resumed from `step` (an older one was asked for)
    continues from there, as metrics.jsonl does, and its pruning must not keep them instead. Those
    in `failed` (skipped by the resume because they did not verify or read) are set aside
    instead."""
    for path in step_checkpoints(folder) if folder.is_dir() else []:
        if path.name <= f"step_{step:07d}.pt":
            continue
        if path in failed:
            log.warning(
                "%s failed its check: kept as %s; the run continues from step %d",
                path,
                set_aside(path).name,
                step,
            )
        else:
            log.warning("removing %s: the run continues from step %d", path, step)
            _remove(path)


# --- reading --------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def verify(path: Path) -> bool:
    """True when the sidecar's hash matches; False when there is no sidecar; CheckpointError when it
    differs or the sidecar is not a sha256 line."""
    side = sidecar(path)
    if not side.is_file():
        return False
    expected = side.read_text(encoding="utf-8", errors="replace").split()[:1]
    if not (
        expected and len(expected[0]) == 64 and all(c in "0123456789abcdef" for c in expected[0])
    ):
        raise CheckpointError(
            f"checkpoint {path} is unverified: its sidecar {side.name} is damaged (no sha256)"
        )
    if expected != [file_sha256(path)]:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its sha256 differs from the one in {side.name}"
        )
    return True


def _load(path: Path, map_location="cpu", old_format: bool = False, mmap: bool = False):
    """torch.load(weights_only=True); `old_format`: the NumPy objects of OLD_FORMAT allowed too (no
    other global)."""
    allowed = [(obj, name) for name, obj in OLD_FORMAT.items()] + _OLD_FORMAT_TYPES
    # torch maps only its zip format; any other file is no checkpoint, as torch.load says
    mmap = mmap and zipfile.is_zipfile(path)
    with torch.serialization.safe_globals(allowed if old_format else []):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


# torch's weights_only refusals name the global: "Unsupported global: GLOBAL numpy.dtype was not an
# allowed global", "unsupported GLOBAL posix.system whose module posix is blocked"
_REFUSED = re.compile(r"GLOBAL (\S+)|unrecognized function (\S+)")


def _refused_global(exc: Exception) -> str | None:
    """The global that torch's weights_only unpickler refused; None for an error of another kind
    (bytes that are no pickle torch.save writes: damage)."""
    found = _REFUSED.search(str(exc))
    return next(g for g in found.groups() if g) if found else None


def _foreign(path: Path, name: str, outcome: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"checkpoint {path} is refused: it names {name}, which no moa_train checkpoint holds, so "
        f"it may carry code; {outcome} (nothing in it ran); loading it with the full unpickler "
        "(torch.load with weights_only=False) is not recommended"
    )


def _unsafe(path: Path, refused: str) -> UnsafeCheckpointError:
    """The refusal of a file whose pickle names `refused`: the convert command where the file is an
    old checkpoint (it loads with the NumPy objects of OLD_FORMAT allowed and no other global), else
    the first other global torch meets, with no advice to run it."""
    if refused in OLD_FORMAT:
        try:
            _load(path, old_format=True, mmap=True)
        except pickle.UnpicklingError as exc:
            refused = _refused_global(exc) or f"{refused} and pickle data torch.save does not write"
        else:
            return UnsafeCheckpointError(
                f"checkpoint {path} was written before checkpoints held tensors and plain values "
                f"only (it holds NumPy objects: {refused}), so it is not loaded; if you trust it, "
                f"convert it once with: {CONVERT.format(path=path)}"
            )
    return _foreign(path, refused, "it is not loaded")


def load_checkpoint(path: Path, map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint's state, read with torch's weights_only unpickler: tensors and plain types, no
    code runs. A file naming another global is refused (UnsafeCheckpointError, naming it)."""
    if not verify(path):
        log.warning(
            "checkpoint %s has no %s beside it: loaded without verification",
            path,
            sidecar(path).name,
        )
    try:
        state = _load(path, map_location, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(exc)
        if refused is None:  # not a refused global, just bytes that are no pickle
            raise CheckpointError(f"checkpoint {path} cannot be read (UnpicklingError)") from None
        raise _unsafe(path, refused) from None
    except Exception as exc:  # truncated or corrupt file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    try:
        state = upgrade_checkpoint(state) if isinstance(state, dict) else state
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    _check_state(path, state)
    return state


# what every checkpoint moa_train has written holds, in every format
REQUIRED = ("model", "step", "config")


def _check_state(path: Path, state) -> None:
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED):
        raise CheckpointError(f"checkpoint {path} is not a moa_train checkpoint")


def checkpoints_in(target: Path) -> list:
    """What a resume from `target` tries, newest first: the file itself; or a run folder's (or its
    checkpoints/ folder's) step_*.pt, then best.pt (also when best.pt is all there is)."""
    if target.is_file():
        return [target]
    for folder in (target / "checkpoints", target):
        found = step_checkpoints(folder)[::-1] if folder.is_dir() else []
        best = folder / "best.pt"
        found += [best] if best.is_file() else []
        if found:
            return found
    return []


def find_checkpoint(target: Path) -> Path | None:
    """A checkpoint file as given, or the latest step_*.pt of a run folder (or of its checkpoints/
    folder)."""
    found = checkpoints_in(target)
    return found[0] if found else None


def load_latest(
    target: Path, map_location="cpu", key: str = "trainer.resume", mmap: bool = False
) -> tuple:
    """(path, state, failed paths) of the newest checkpoint under `target` that verifies and reads;
    each one that does not is named in a warning. A file given as `target` is used as it is, with no
    fallback, and a file that only a full unpickler reads stops the search (it is never loaded).
    `mmap`: the tensors mapped from the file, not read (for a look at the config)."""
    failed = []
    for path in checkpoints_in(target):
        try:
            return path, load_checkpoint(path, map_location, mmap), tuple(failed)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            if target.is_file():
                raise
            log.warning("%s; trying the previous checkpoint", exc)
            failed.append(path)
    raise CheckpointError(
        f"{key}: no readable checkpoint in {target} (damaged: "
        f"{', '.join(p.name for p in failed)}); use trainer.resume=false with a new hydra.run.dir "
        "to start over"
    )


def average_checkpoints(paths: list, map_location="cpu") -> dict:
    """The element-wise mean of the model weights of several checkpoints (fairseq's
    average_checkpoints)."""
    total = None
    for path in paths:
        weights = load_checkpoint(path, map_location)["model"]
        if total is None:
            total = {k: v.double().clone() for k, v in weights.items()}
        else:
            for k, v in weights.items():
                total[k] += v.double()
    return {k: (v / len(paths)).to(weights[k].dtype) for k, v in total.items()}


# --- converting checkpoints written before weights_only loading -----------------------------------


def convert(path: Path) -> bool:
    """Rewrite an old checkpoint so that weights_only loads it, atomically, with the NumPy RNG
    states as tensors. First its sidecar is checked (CheckpointError where the hash differs: a
    damaged file never gets a new sidecar); then it is read with weights_only and the NumPy objects
    of OLD_FORMAT allowed, so nothing in it runs and a file naming any other global is refused.
    Returns whether it had a sidecar."""
    try:
        verified = verify(path)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}; not converted (a file that fails its hash gets no new one)"
        ) from None
    try:
        state = _load(path, old_format=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(exc)
        if refused is None:
            raise CheckpointError(f"checkpoint {path} cannot be read; not converted") from None
        raise _foreign(path, refused, "it is not converted") from None
    _check_state(path, state)
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    for rng in rngs:
        rng["numpy"] = _numpy_rng_state(rng["numpy"])
    atomic_save(state, path)
    load_checkpoint(path)  # proves the rewritten file loads safely
    return verified


def convert_main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m moa_train.train.checkpoint",
        description="Rewrite old checkpoints so that they load without running code.",
    )
    parser.add_argument("command", choices=["convert"])
    parser.add_argument("paths", nargs="+", type=Path, help="checkpoint files or run folders")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="required: NumPy's unpickling code reads each file (the old format's arrays, no "
        "other object: a file naming anything else is refused)",
    )
    args = parser.parse_args(argv)
    if not args.trust_pickle:
        print(
            "error: --trust-pickle: converting lets NumPy's unpickling code read each file (the "
            "old format's arrays; a file naming any other object is refused); add --trust-pickle "
            "for files you trust",
            file=sys.stderr,
        )
        return 2
    for target in args.paths:
        found = checkpoints_in(target)
        if not found:
            print(
                f"error: {target}: no checkpoint file or run folder with checkpoints",
                file=sys.stderr,
            )
            return 2
        for path in found:
            try:
                verified = convert(path)
            except CheckpointError as exc:  # damaged, or not an old checkpoint: convert no more
                print(f"error: {exc}", file=sys.stderr)
                return 2
            except Exception as exc:
                print(
                    f"error: {path}: cannot be converted ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0]})",
                    file=sys.stderr,
                )
                return 2
            print(f"converted {path}" + ("" if verified else " (it had no sidecar: unverified)"))
    return 0


if __name__ == "__main__":
    sys.exit(convert_main())
