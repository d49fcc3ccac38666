#!/usr/bin/env bash
# The successors' small paper checks in one device call, from the project root after
# `source .gpu/activate.sh` (../shared/gpu/prepare.sh): all 12 runs (2 checks x 2 rows x 3 seeds) at
# once on one GPU, records and tables written under OUT, packed into records.tgz.
#   bash docs/results/runs/successors/call_2026-12-06.sh OUT [extra moa-train overrides]
set -uo pipefail
out=$1; shift
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
date -u +%FT%T > "$out/times.txt"
timeout 560 python3 scripts/reproduce_successors.py --jobs 12 --runs-dir "$out/runs" \
  --out "$out/successors" "$@" > "$out/driver.log" 2>&1
echo "exit $?" >> "$out/times.txt"; date -u +%FT%T >> "$out/times.txt"
# the records without checkpoints (not run records; the tarball stays small)
find "$out/runs" -name checkpoints -type d -prune -exec rm -rf {} + 2>/dev/null
tar -czf "$out/records.tgz" -C "$out" runs successors.md successors.json driver.log times.txt gpu.txt 2>/dev/null
tail -30 "$out/driver.log"; ls -la "$out"
