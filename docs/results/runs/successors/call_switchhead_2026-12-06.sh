#!/usr/bin/env bash
# SwitchHead's small paper check in one device call, from the project root after
# `source .gpu/activate.sh` (../shared/gpu/prepare.sh): its 9 runs (mha_wide, switchhead, mha_narrow
# x 3 seeds; bf16 + compile + CUDA graph, as the MoH check's _common) at once, then the table.
# The runs live in outputs/calls/switchhead_wt2/ (git-ignored, so kept on a warm device machine: a
# second call after a cut resumes them, --keep-finished); OUT receives the tables, the logs and
# records.tgz (the run records without checkpoints).
#   MOA_GIT_SHA=<commit> bash docs/results/runs/successors/call_switchhead_2026-12-06.sh OUT [SECONDS [OVERRIDE ...]]
# (overrides after SECONDS go to every run: a CPU dry run of this script with debug=tiny etc.)
set -uo pipefail
out=${1:-$OUT}; limit=${2:-500}
export MOA_GIT_SHA=${MOA_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null)}
work=outputs/calls/switchhead_wt2
mkdir -p "$out" "$work"; out=$(cd "$out" && pwd)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt" || echo none > "$out/gpu.txt"
date -u +%FT%T >> "$out/times.txt"
timeout "$limit" python3 scripts/reproduce_successors.py --checks switchhead_wt2 --jobs 9 \
  --keep-finished --runs-dir "$work/runs" --out "$out/successors" "${@:3}" >> "$out/driver.log" 2>&1
echo "switchhead exit $?" >> "$out/times.txt"; date -u +%FT%T >> "$out/times.txt"
tar -czf "$out/records.tgz" --exclude=checkpoints -C "$work" runs
tail -30 "$out/driver.log"; cat "$out/times.txt"; ls -la "$out"
