#!/usr/bin/env bash
# Two issues' GPU tables in one device call (machines are scarce), from the project root after
# `source .gpu/activate.sh`: the MLM table (docs/results/runs/mlm/call_2026-12-06.sh: 21 runs) in the
# background, beside it the successors' checks (docs/results/runs/successors/call_2026-12-06.sh: the
# MoH check's 6 runs, then the MAE check's 6), everything ending by DEADLINE seconds; records and
# tables under OUT/{mlm,succ}, each part packed into its own records.tgz.
#   bash docs/results/runs/combined_2026-12-06.sh OUT [DEADLINE]
set -uo pipefail
out=$1; deadline=${2:-545}; t0=$(date +%s)
mkdir -p "$out"
left() { echo $(( deadline - ($(date +%s) - t0) - ${1:-0} )); }
bash docs/results/runs/mlm/call_2026-12-06.sh "$out/mlm" "$(left 25)" > "$out/mlm.out" 2>&1 &
mlm=$!
s=$out/succ; mkdir -p "$s"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$s/gpu.txt"
pack() {
  find "$s/runs" -name checkpoints -type d -prune -exec rm -rf {} + 2>/dev/null
  tar -czf "$s/records.tgz" -C "$s" runs successors.md successors.json driver.log times.txt gpu.txt \
    2>/dev/null
}
date -u +%FT%T > "$s/times.txt"
timeout 260 python3 scripts/reproduce_successors.py --checks moh_wt2 --jobs 6 --runs-dir "$s/runs" \
  --out "$s/successors" > "$s/driver.log" 2>&1
echo "moh exit $?" >> "$s/times.txt"; date -u +%FT%T >> "$s/times.txt"; pack
timeout "$(left 20)" python3 scripts/reproduce_successors.py --checks mae_multi30k --jobs 6 \
  --runs-dir "$s/runs" --out "$s/successors" >> "$s/driver.log" 2>&1
echo "mae exit $?" >> "$s/times.txt"; date -u +%FT%T >> "$s/times.txt"; pack
wait $mlm
tail -12 "$s/driver.log"; cat "$s/times.txt"; tail -30 "$out/mlm.out"
