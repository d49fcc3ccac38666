"""The table of RUN.md and inference_notes.md (2026-12-07c), from this folder's records: per old /
new moas_kv process, its decode tokens/s (inference.json) and what its own compilation chose at
batch 1 (inductor_picks.tgz: each process's Triton kernel sources with the launch configuration
autotuning picked, and calls_b1.txt, the compiled step's kernel and cuBLAS calls in order).

    python3 picks_table.py        (from anywhere; reads the files beside it)
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the pool attention's softmax over the positions (HeadPool.attend): one reduction per layer
SOFTMAX = "triton_red_fused__softmax__to_copy_add_arange_bitwise_not_bmm"


def members(tar: tarfile.TarFile, process: str) -> dict:
    """name -> text of the files under ./inductor_<process>/."""
    out = {}
    for m in tar.getmembers():
        if m.isfile() and m.name.startswith(f"./inductor_{process}/"):
            out[m.name] = tar.extractfile(m).read().decode()
    return out


def softmax_pick(files: dict) -> str:
    """The launch configuration picked for the batch-1 softmax kernel (12 rows: xnumel = 12)."""
    for name, text in files.items():
        if name.endswith(".py") and f"def {SOFTMAX}" in text and "xnumel = 12\n" in text:
            folder = name.rsplit("/", 1)[0]
            configs = [
                t for n, t in files.items() if n.startswith(folder) and n.endswith(".best_config")
            ]
            if len(configs) == 1:
                c = json.loads(configs[0])
                return f"XBLOCK {c['XBLOCK']}, R0_BLOCK {c['R0_BLOCK']}, {c['num_warps']} warps"
    return "?"


def main() -> None:
    rows = []
    with tarfile.open(HERE / "inductor_picks.tgz") as tar:
        for process in ("old1", "new1", "new2", "old2", "new3", "old3", "new4", "old4"):
            files = members(tar, process)
            calls = files[f"./inductor_{process}/calls_b1.txt"].splitlines()
            padded = any(re.search(r"fused_mm_t_\d+\.run", c) for c in calls)
            data = json.loads((HERE / process / "inference.json").read_text())
            decode = data["results"]["gpt2/moas_kv"]["decode"]
            rows.append(
                (
                    process,
                    decode["1"]["tokens_per_s"],
                    decode["64"]["tokens_per_s"],
                    softmax_pick(files),
                    len(calls),
                    "yes" if padded else "no",
                )
            )
    head = ("process", "b1 tok/s", "b64 tok/s", "b1 softmax kernel's pick", "b1 step's calls")
    print("| " + " | ".join((*head, "router mm padded")) + " |")
    print("|---|---:|---:|---|---:|---|")
    for p, b1, b64, pick, n, pad in rows:
        print(f"| {p} | {b1:,.0f} | {b64:,.0f} | {pick} | {n} | {pad} |")


if __name__ == "__main__":
    main()
