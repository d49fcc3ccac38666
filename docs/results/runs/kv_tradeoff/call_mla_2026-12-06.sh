#!/usr/bin/env bash
# The KV trade-off study's MLA rows in one device call, from the project root after
# `source .gpu/activate.sh` (../shared/gpu/prepare.sh): mla_r64 and mla_r128 x 3 seeds, 6 runs at once
# with the study's settings (RUN.md: mode=fast, the driver's evaluation), trained into a copy of the
# committed records (outputs/calls/kv_tradeoff_mla/runs: the 27 runs there are neither retrained nor
# moved), so the driver's tables include all 33 runs. The copy is git-ignored, so kept on a warm
# device machine: a second call after a cut resumes (--keep-finished). OUT receives the tables,
# the logs and records.tgz (the 6 new run folders; checkpoints are deleted by the driver's
# evaluation). Then, on the CPU machine: unpack OUT/records.tgz into docs/results/runs/kv_tradeoff/
# (`tar -xzf records.tgz --strip-components=1 -C docs/results/runs/kv_tradeoff`) and rebuild with
#   RESULTS_NOTE="..." python3 scripts/reproduce_kv_tradeoff.py --tables-only
# (it keeps the committed file's date and --jobs 27; device, torch and git from the first row, mha).
#   MOA_GIT_SHA=<commit> bash docs/results/runs/kv_tradeoff/call_mla_2026-12-06.sh OUT [SECONDS [OVERRIDE ...]]
# (overrides after SECONDS go to every run: a CPU dry run of this script with debug=tiny etc.)
set -uo pipefail
out=${1:-$OUT}; limit=${2:-500}
export MOA_GIT_SHA=${MOA_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null)}
work=outputs/calls/kv_tradeoff_mla
mkdir -p "$out" "$work"; out=$(cd "$out" && pwd)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt" || echo none > "$out/gpu.txt"
[ -d "$work/runs" ] || cp -r docs/results/runs/kv_tradeoff "$work/runs"
date -u +%FT%T >> "$out/times.txt"
timeout "$limit" python3 scripts/reproduce_kv_tradeoff.py --rows mla_r64,mla_r128 --jobs 6 \
  --keep-finished --runs-dir "$work/runs" --out "$out/kv_tradeoff" "${@:3}" >> "$out/driver.log" 2>&1
echo "mla exit $?" >> "$out/times.txt"; date -u +%FT%T >> "$out/times.txt"
(cd "$work" && tar -czf "$out/records.tgz" --exclude=checkpoints runs/mla_r*-seed* 2>/dev/null \
  || tar -czf "$out/records.tgz" --exclude=checkpoints runs/.staging)
tail -40 "$out/driver.log"; cat "$out/times.txt"; ls -la "$out"
