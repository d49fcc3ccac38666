"""Compare the Triton launch configurations two inductor cache folders chose (issue 27's moas_kv old
/ new processes, each compiled into an empty TORCHINDUCTOR_CACHE_DIR by paths_2026-12-07c.sh).

    python3 compare_picks.py DIR_A DIR_B

A kernel's file name in inductor's cache is a hash of its source, so a stem present in both folders
is the same kernel; its `.best_config` is what autotuning picked in that process. Prints the kernels
only one folder compiled and, for the shared ones, those whose picked configuration differs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

IGNORED = {"time_taken_ms", "triton_cache_hash"}  # the timing and cache bookkeeping, not the pick


def picks(folder: Path) -> dict:
    """kernel source stem -> its picked configuration. A `.best_config` is named by a hash of its
    own and lies in the folder of its kernel's source file (the folder holds one kernel file)."""
    out = {}
    for f in folder.rglob("*.best_config"):
        data = json.loads(f.read_text())
        sources = [p for p in f.parent.glob("*.py") if is_kernel(p)]
        stem = sources[0].stem if len(sources) == 1 else f"{f.parent.name}/?{f.stem[:8]}"
        out[stem] = {k: v for k, v in data.items() if k not in IGNORED}
    return out


def is_kernel(path: Path) -> bool:
    """A file holding one Triton kernel (not a graph's wrapper code calling many)."""
    return (
        sum(
            line.startswith("def triton_") for line in path.read_text(errors="replace").splitlines()
        )
        == 1
    )


def kernels(folder: Path) -> dict:
    """stem -> the kernel function names in that source file (triton kernels only)."""
    out = {}
    for f in folder.rglob("*.py"):
        names = [
            line.split("def ", 1)[1].split("(", 1)[0]
            for line in f.read_text(errors="replace").splitlines()
            if line.startswith("def triton_")
        ]
        if names:
            out[f.stem] = names
    return out


def main(a: str, b: str) -> None:
    pa, pb = picks(Path(a)), picks(Path(b))
    ka, kb = kernels(Path(a)), kernels(Path(b))
    for name, k, p in ((a, ka, pa), (b, kb, pb)):
        print(f"{name}: {len(k)} kernel files, {len(p)} picks")
    for name, only in ((a, set(ka) - set(kb)), (b, set(kb) - set(ka))):
        print(f"only in {name}: {len(only)}")
        for s in sorted(only):
            print("   ", s[:12], ka.get(s) or kb.get(s), pa.get(s) or pb.get(s))
    shared = sorted(set(pa) & set(pb))
    diff = [s for s in shared if pa[s] != pb[s]]
    print(f"shared kernels with picks: {len(shared)}; picked differently: {len(diff)}")
    for s in diff:
        print("   ", s[:12], (ka.get(s) or ["?"])[0], "\n      A", pa[s], "\n      B", pb[s])
    # the same kernels may hash differently (a renamed buffer): match by kernel name as well
    na = {ka[s][0]: pa[s] for s in pa if s in ka}
    nb = {kb[s][0]: pb[s] for s in pb if s in kb}
    both = sorted(set(na) & set(nb))
    by_name = [n for n in both if na[n] != nb[n]]
    print(f"by kernel name: {len(both)} in both, picked differently: {len(by_name)}")
    for n in by_name:
        print("   ", n, "\n      A", na[n], "\n      B", nb[n])


if __name__ == "__main__":
    main(*sys.argv[1:3])
