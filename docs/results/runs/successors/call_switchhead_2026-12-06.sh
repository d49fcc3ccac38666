#!/usr/bin/env bash
# SwitchHead's small paper check in one device call, from the project root after
# `source .gpu/activate.sh` (../shared/gpu/prepare.sh): its 9 runs (mha_wide, switchhead, mha_narrow
# x 3 seeds; bf16 + compile + CUDA graph, as the MoH check's _common) at once, then the table;
# records and tables under OUT, packed into records.tgz (also after a cut: --keep-finished on a
# second call resumes what the first left in OUT/runs/.staging/).
#   MOA_GIT_SHA=<commit> bash docs/results/runs/successors/call_switchhead_2026-12-06.sh OUT [SECONDS [OVERRIDE ...]]
# (overrides after SECONDS go to every run: a CPU dry run of this script with debug=tiny etc.)
set -uo pipefail
out=${1:-$OUT}; limit=${2:-500}
export MOA_GIT_SHA=${MOA_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null)}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt" || echo none > "$out/gpu.txt"
pack() {
  find "$out/runs" -name checkpoints -type d -prune -exec rm -rf {} + 2>/dev/null
  tar -czf "$out/records.tgz" -C "$out" runs successors.md successors.json driver.log times.txt \
    gpu.txt 2>/dev/null
}
date -u +%FT%T > "$out/times.txt"
timeout "$limit" python3 scripts/reproduce_successors.py --checks switchhead_wt2 --jobs 9 \
  --keep-finished --runs-dir "$out/runs" --out "$out/successors" "${@:3}" > "$out/driver.log" 2>&1
echo "switchhead exit $?" >> "$out/times.txt"; date -u +%FT%T >> "$out/times.txt"; pack
tail -30 "$out/driver.log"; cat "$out/times.txt"; ls -la "$out"
