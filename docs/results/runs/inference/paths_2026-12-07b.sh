#!/usr/bin/env bash
# Issue 27's measurements of 2026-12-07 (call 10; RUN.md in paths_2026-12-07b/), from the project
# root on the GPU machine after `source .gpu/activate.sh`, with `.gpu` and `.base` carried (.base =
# `git archive 75d305d moa_train configs pyproject.toml`, the commit before the redesign):
#   1. moas_kv, the benchmark's compiled step, old / new / old / new (--no-paths): the batch-1 gap of
#      inference_notes.md against the process-to-process spread, in one call;
#   2. ONE new moa-bench --decode run of every row the targets name, moas_dynamic first (its
#      generate() rows were cut twice), with transformers' static cache and the fresh processes
#      (--cli): bench, eager and CLI rows from one run. About 15 minutes: it spans two device calls.
# Started in its own process session, which runs on while the machine stays warm; each call waits:
#   start: setsid bash docs/results/runs/inference/paths_2026-12-07b.sh W > W.out 2>&1 < /dev/null &
#   then:  bash docs/results/runs/inference/paths_2026-12-07b.sh --wait W SECONDS OUT   (call again at once)
set -uo pipefail
if [ "$1" = --wait ]; then  # wait up to SECONDS for the run to end, then pack what it wrote
  w=$2 secs=$3 out=$4
  for _ in $(seq "$secs"); do [ -f "$w/done" ] && break; sleep 1; done
  tar -czf "$out/paths.tgz" -C "$(dirname "$w")" "$(basename "$w")" "$(basename "$w").out"
  for f in "$w"/*.log; do echo "== $f"; tail -n 5 "$f"; done; cat "$w/times.txt"; exit 0
fi
w=$1
mkdir -p "$w"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$w/gpu.txt"
stamp() { echo "$(date -u +%T) $1" >> "$w/times.txt"; }
old() {
  (cd .base && PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m moa_train.bench --decode --no-hf \
    --no-trace --models moas_kv --out "$w/old$1") >> "$w/old$1.log" 2>&1
}
new() {
  timeout 200 python3 -m moa_train.bench --decode --no-trace --no-paths --no-hf --models moas_kv \
    --out "$w/new$1" >> "$w/new$1.log" 2>&1
}
stamp start
old 1; stamp "old 1"; new 1; stamp "new 1"; old 2; stamp "old 2"; new 2; stamp "new 2"
timeout 1500 python3 -m moa_train.bench --decode --no-trace \
  --models moas_dynamic,mha,gqa,moa_sparse,moas_kv --hf-settings static --cli \
  --out "$w/run" >> "$w/run.log" 2>&1
stamp "one run (bench, generate, eager, transformers static, cli)"
touch "$w/done"
