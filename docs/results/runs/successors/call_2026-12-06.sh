#!/usr/bin/env bash
# The successors' small paper checks in one device call, from the project root after
# `source .gpu/activate.sh` (../shared/gpu/prepare.sh): the MoH check's 6 runs at once, then the MAE
# check's 6 runs at once (a cut call keeps the first check's records), records and tables under
# OUT, packed into records.tgz.
#   bash docs/results/runs/successors/call_2026-12-06.sh OUT [MAE_SECONDS]
set -uo pipefail
out=$1; mae_s=${2:-330}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
pack() {
  find "$out/runs" -name checkpoints -type d -prune -exec rm -rf {} + 2>/dev/null
  tar -czf "$out/records.tgz" -C "$out" runs successors.md successors.json driver.log times.txt \
    gpu.txt 2>/dev/null
}
date -u +%FT%T > "$out/times.txt"
timeout 200 python3 scripts/reproduce_successors.py --checks moh_wt2 --jobs 6 --runs-dir "$out/runs" \
  --out "$out/successors" > "$out/driver.log" 2>&1
echo "moh exit $?" >> "$out/times.txt"; date -u +%FT%T >> "$out/times.txt"; pack
timeout "$mae_s" python3 scripts/reproduce_successors.py --checks mae_multi30k --jobs 6 \
  --runs-dir "$out/runs" --out "$out/successors" >> "$out/driver.log" 2>&1
echo "mae exit $?" >> "$out/times.txt"; date -u +%FT%T >> "$out/times.txt"; pack
tail -30 "$out/driver.log"; cat "$out/times.txt"; ls -la "$out"
