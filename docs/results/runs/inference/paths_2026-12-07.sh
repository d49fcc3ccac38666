#!/usr/bin/env bash
# Issue 27's measurements in one benchmark run, from the project root on the GPU machine after
# `source .gpu/activate.sh`, with `.gpu` and `.base` carried (.base = the commit before the redesign,
# `git archive 75d305d moa_train configs pyproject.toml`):
#   1. the old code's moa-bench --decode for moas_kv (compiled + CUDA graph);
#   2. ONE new moa-bench --decode run: moas_kv, gqa, moa_sparse, moas_dynamic (+ its top1 row) and mha,
#      each with its generate() and eager rows, transformers' compiled static cache, and the
#      fresh-process rows (--cli): bench, eager and CLI rows side by side from one run;
#   3. the old code's moas_kv again, then the new code's (--no-paths): old, new, old, new.
# It outlasts one device call (10 minutes), so the first call starts it in its own process session
# (setsid), which runs on while the machine stays warm, and each call waits for it:
#   start: setsid bash docs/results/runs/inference/paths_2026-12-07.sh W > W.out 2>&1 < /dev/null &
#   then:  bash docs/results/runs/inference/paths_2026-12-07.sh --wait W SECONDS OUT
set -uo pipefail
if [ "$1" = --wait ]; then  # wait up to SECONDS for the run to end, then pack what it wrote
  w=$2 secs=$3 out=$4
  for _ in $(seq "$secs"); do [ -f "$w/done" ] && break; sleep 1; done
  tar -czf "$out/paths.tgz" -C "$(dirname "$w")" "$(basename "$w")" "$(basename "$w").out"
  tail -5 "$w"/*.log; cat "$w/times.txt"; exit 0
fi
w=$1
mkdir -p "$w"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$w/gpu.txt"
stamp() { echo "$(date -u +%T) $1" >> "$w/times.txt"; }
base() {  # the commit before, its own benchmark (compiled + CUDA graph), no transformers rows
  (cd .base && PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m moa_train.bench --decode --no-hf \
    --no-trace --models moas_kv --out "$w/base$1") >> "$w/base$1.log" 2>&1
}
stamp start
base 1; stamp "old moas_kv (1) done"
timeout 1500 python3 -m moa_train.bench --decode --no-trace \
  --models moas_kv,gqa,moa_sparse,moas_dynamic,mha --hf-settings static --cli \
  --out "$w/new" >> "$w/new.log" 2>&1
stamp "new run (bench, generate, eager, transformers static, cli) done"
base 2; stamp "old moas_kv (2) done"
timeout 200 python3 -m moa_train.bench --decode --no-trace --no-paths --models moas_kv --no-hf \
  --out "$w/new2" >> "$w/new2.log" 2>&1
stamp "new moas_kv (2) done"
touch "$w/done"
