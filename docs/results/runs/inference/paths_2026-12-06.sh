#!/usr/bin/env bash
# The inference redesign measured on one GPU, in device calls under the 10-minute limit, from the
# project root after `source .gpu/activate.sh`:
#   bash docs/results/runs/inference/paths_2026-12-06.sh 1|2|3|4 OUT
# .base/ holds the commit before the redesign (git archive 75d305d moa_train configs pyproject.toml):
# its moa-bench --decode runs beside the new one in the same call, on the same card.
set -uo pipefail
part=$1 out=$2
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
base() {  # the commit before, its own benchmark (compiled + CUDA graph), no transformers rows
  (cd .base && PYTHONPATH=/tmp/site:$PWD timeout "$1" python3 -m moa_train.bench --decode --no-hf \
    --no-trace --models "$2" --out "$out/base") >> "$out/base.log" 2>&1
}
new() {
  timeout "$1" python3 -m moa_train.bench --decode --no-trace --models "$2" "${@:3}" \
    --out "$out/new" >> "$out/new.log" 2>&1
}
if [ "$part" = 1 ]; then
  # a smoke test at the tiny size first: a broken path fails in seconds, not minutes
  timeout 120 python3 -m moa_train.bench --decode --decode-size tiny --models mha --no-hf \
    --out "$out/smoke" > "$out/smoke.log" 2>&1 || { tail -20 "$out/smoke.log"; exit 1; }
  base 200 mha,gqa,moa_sparse,moas_kv
  new 300 mha,gqa,moa_sparse,moas_kv --no-hf
elif [ "$part" = 2 ]; then
  base 110 moas_dynamic,moas_kv
  new 190 moas_dynamic,moas_kv --no-hf
  new 190 mha --hf-only --hf-settings static
elif [ "$part" = 3 ]; then
  new 330 mha --hf-only --no-hf --cli
elif [ "$part" = 5 ]; then  # next session: the variants call 1 left without an old/new pair
  date -u +%T > "$out/times.txt"
  base 170 moas_dynamic,moas_kv; date -u +%T >> "$out/times.txt"
  new 390 moas_dynamic,moas_kv --no-hf; date -u +%T >> "$out/times.txt"
elif [ "$part" = 6 ]; then  # gqa re-measured without the per-step logits copy; moas_kv again
  date -u +%T > "$out/times.txt"
  base 150 gqa,moas_kv; date -u +%T >> "$out/times.txt"
  new 300 gqa,moas_kv --no-hf; date -u +%T >> "$out/times.txt"
  base 100 moas_kv; date -u +%T >> "$out/times.txt"
elif [ "$part" = 7 ]; then  # parts 5 and 6 in one call, when only one call can be had
  date -u +%T > "$out/times.txt"
  base 170 moas_kv,moas_dynamic,gqa; date -u +%T >> "$out/times.txt"
  new 390 moas_kv,moas_dynamic,gqa --no-hf; date -u +%T >> "$out/times.txt"
elif [ "$part" = 8 ]; then  # moas_kv b1 below target: inductor's GPU code, old against new (gqa dropped: time)
  date -u +%T > "$out/times.txt"
  (cd .base && TORCH_LOGS=output_code TORCHINDUCTOR_UNIQUE_KERNEL_NAMES=1 PYTHONPATH=/tmp/site:$PWD \
    timeout 130 python3 -m moa_train.bench --decode --no-hf --no-trace --models moas_kv \
    --out "$out/base") > "$out/base_code.log" 2>&1; date -u +%T >> "$out/times.txt"
  TORCH_LOGS=output_code TORCHINDUCTOR_UNIQUE_KERNEL_NAMES=1 timeout 130 python3 -m moa_train.bench \
    --decode --no-hf --no-trace --no-paths --models moas_kv --out "$out/new" > "$out/new_code.log" 2>&1
  date -u +%T >> "$out/times.txt"
  gzip -k "$out/base_code.log" "$out/new_code.log"
  tar -czf "$out/records.tgz" -C "$out" base new base_code.log.gz new_code.log.gz times.txt 2>/dev/null
  ls -la "$out"; exit 0
else  # what device time allowed after call 1: no old-code rows
  new 240 mha,moas_dynamic,moas_kv --no-hf
  new 130 mha --hf-only --hf-settings static
  new 200 mha --hf-only --no-hf --cli
fi
tar -czf "$out/records.tgz" -C "$out" $(cd "$out" && ls -d base new 2>/dev/null) 2>/dev/null
ls -la "$out"
