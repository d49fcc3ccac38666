#!/usr/bin/env bash
# The MLM table (docs/results/mlm.md) in one device call, from the project root after
# `source .gpu/activate.sh` (../shared/gpu/prepare.sh): every row of configs/experiment/moa_mlm/ x 3
# seeds at once on one GPU (bf16 autocast, TF32, torch.compile; the recipe otherwise as committed),
# records and tables under OUT, packed into records.tgz.
#   bash docs/results/runs/mlm/call_2026-12-06.sh OUT [SECONDS]
set -uo pipefail
out=$1; limit=${2:-500}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
date -u +%FT%T > "$out/times.txt"
timeout "$limit" python3 scripts/reproduce_mlm.py --jobs 21 --runs-dir "$out/runs" --out "$out/mlm" \
  trainer.precision=bf16 trainer.tf32=true trainer.compile=true > "$out/driver.log" 2>&1
echo "mlm exit $?" >> "$out/times.txt"; date -u +%FT%T >> "$out/times.txt"
find "$out/runs" -name checkpoints -type d -prune -exec rm -rf {} + 2>/dev/null
for f in "$out"/runs/.staging/*.log; do tail -2 "$f" | sed "s|^|$(basename "$f"): |"; done > "$out/tails.txt" 2>/dev/null
tar -czf "$out/records.tgz" -C "$out" runs mlm.md mlm.json driver.log times.txt gpu.txt tails.txt 2>/dev/null
tail -25 "$out/driver.log"; cat "$out/times.txt"; ls -la "$out"
