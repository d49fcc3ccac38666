#!/usr/bin/env bash
# The KV trade-off study's MLA rows in one device call, from the project root after
# `source .gpu/activate.sh` (../shared/gpu/prepare.sh): mla_r64 and mla_r128 x 3 seeds, 6 runs at once
# with the study's settings (RUN.md: mode=fast, the driver's evaluation), trained into a copy of the
# committed records (OUT/runs; the 27 runs there are neither retrained nor moved), so the driver's
# tables in OUT include all 33 runs. Packed into OUT/records.tgz: the 6 new run folders (no
# checkpoints), the tables, the driver's log. Then, on the CPU machine: copy OUT's runs/mla_r*-seed*
# into docs/results/runs/kv_tradeoff/ and rebuild with
#   RESULTS_NOTE="..." python3 scripts/reproduce_kv_tradeoff.py --tables-only
# (it keeps the committed file's date, --jobs 27 and device line, taken from the first row, mha).
#   MOA_GIT_SHA=<commit> bash docs/results/runs/kv_tradeoff/call_mla_2026-12-06.sh OUT [SECONDS [OVERRIDE ...]]
# (overrides after SECONDS go to every run: a CPU dry run of this script with debug=tiny etc.)
set -uo pipefail
out=${1:-$OUT}; limit=${2:-500}
export MOA_GIT_SHA=${MOA_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null)}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt" || echo none > "$out/gpu.txt"
rm -rf "$out/runs" && cp -r docs/results/runs/kv_tradeoff "$out/runs"
pack() {
  find "$out/runs" -name checkpoints -type d -prune -exec rm -rf {} + 2>/dev/null
  (cd "$out" && tar -czf records.tgz runs/mla_r*-seed* runs/.staging kv_tradeoff.md \
    kv_tradeoff.json kv_tradeoff.png driver.log times.txt gpu.txt 2>/dev/null)
}
date -u +%FT%T > "$out/times.txt"
timeout "$limit" python3 scripts/reproduce_kv_tradeoff.py --rows mla_r64,mla_r128 --jobs 6 \
  --keep-finished --runs-dir "$out/runs" --out "$out/kv_tradeoff" "${@:3}" > "$out/driver.log" 2>&1
echo "mla exit $?" >> "$out/times.txt"; date -u +%FT%T >> "$out/times.txt"; pack
tail -40 "$out/driver.log"; cat "$out/times.txt"; ls -la "$out"
