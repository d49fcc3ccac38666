#!/usr/bin/env bash
# Issue 27's measurements of 2026-12-07 (call 11; it was paths_next.sh until it ran; records in
# paths_2026-12-07c/, RUN.md), from the project root on the GPU machine after `source
# .gpu/activate.sh`, with `.gpu` and `.base` carried ON EVERY CALL (a call without them removes them
# from the device's copy). .base = `git archive 75d305d moa_train configs pyproject.toml`, the
# commit before the redesign.
#   1. moas_kv, old / new / new / old (order balanced), every process compiling afresh into an empty
#      inductor cache folder of its own (TORCHINDUCTOR_CACHE_DIR), which keeps its kernels' sources
#      (*.py) and the launch configurations autotuning chose (*.best_config): a difference of the
#      code told from a difference of what one process's compilation picked;
#   2. then ONE moa-bench --decode run of mha, gqa, moa_sparse and moas_kv with transformers' static
#      cache and the fresh processes (--cli): bench, generate(), eager and CLI rows from one run
#      (moas_dynamic left out to fit the session's device time: run 2026-12-07_05-04-04 has its rows).
# Started in its own process session, which runs on while the machine stays warm; each call waits:
#   start: setsid bash docs/results/runs/inference/paths_2026-12-07c.sh W > W.out 2>&1 < /dev/null &
#   then:  bash docs/results/runs/inference/paths_2026-12-07c.sh --wait W SECONDS OUT   (call again at once)
set -uo pipefail
if [ "$1" = --wait ]; then  # wait up to SECONDS for the run to end, then pack what it wrote
  w=$2 secs=$3 out=$4
  for _ in $(seq "$secs"); do [ -f "$w/done" ] && break; sleep 1; done
  tar -czf "$out/paths.tgz" -C "$(dirname "$w")" "$(basename "$w")" "$(basename "$w").out"
  for f in "$w"/*.log; do echo "== $f"; grep -h "batch\|failed\|error" "$f" | tail -n 12; done
  cat "$w/times.txt"; exit 0
fi
w=$1
mkdir -p "$w"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$w/gpu.txt"
stamp() { echo "$(date -u +%T) $1" >> "$w/times.txt"; }
keep_picks() {  # an inductor cache folder, less all but its kernels' sources and chosen configs
  find "$1" -type f ! -name '*.best_config' ! -name '*.py' -delete
}
old() {
  (cd .base && TORCHINDUCTOR_CACHE_DIR="$w/inductor_old$1" PYTHONPATH=/tmp/site:$PWD timeout 200 \
    python3 -m moa_train.bench --decode --no-hf --models moas_kv --out "$w/old$1") \
    >> "$w/old$1.log" 2>&1
  keep_picks "$w/inductor_old$1"
}
new() {
  TORCHINDUCTOR_CACHE_DIR="$w/inductor_new$1" timeout 200 python3 -m moa_train.bench --decode \
    --no-paths --no-hf --models moas_kv --out "$w/new$1" >> "$w/new$1.log" 2>&1
  keep_picks "$w/inductor_new$1"
}
stamp start
old 1; stamp "old 1"; new 1; stamp "new 1"; new 2; stamp "new 2"; old 2; stamp "old 2"
timeout 1500 python3 -m moa_train.bench --decode --no-trace \
  --models mha,gqa,moa_sparse,moas_kv --hf-settings static --cli \
  --out "$w/run" >> "$w/run.log" 2>&1
stamp "one run (bench, generate, eager, transformers static, cli)"
touch "$w/done"
