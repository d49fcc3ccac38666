"""Compare the Triton launch configurations two inductor cache folders chose (issue 27's moas_kv old
/ new processes, each compiled into an empty TORCHINDUCTOR_CACHE_DIR by paths_next.sh).

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
    out = {}
    for f in folder.rglob("*.best_config"):
        data = json.loads(f.read_text())
        out[f.stem] = {k: v for k, v in data.items() if k not in IGNORED}
    return out


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
    print(f"{a}: {len(ka)} kernel files, {len(pa)} picks; {b}: {len(kb)} kernel files, {len(pb)} picks")
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
