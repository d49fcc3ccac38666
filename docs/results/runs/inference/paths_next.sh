#!/usr/bin/env bash
# Issue 27's last measurement, for the next session with a GPU (not run yet): the benchmark's
# compiled figure before and after the redesign, in one call, for the target rows whose before/after
# is missing or stale: mha, gqa and moa_sparse (call 1, 2026-12-06, measured them while the new step
# still copied the logits out of the graph; gqa b64 0.949) and moas_dynamic with its top1 row (never
# measured). moas_kv's before/after is in paths_2026-12-07c/ (eight fresh compilations).
# From the project root on the GPU machine after `source .gpu/activate.sh`, with `.gpu` and `.base`
# carried ON EVERY CALL (a call without them removes them from the device's copy). .base = `git
# archive 75d305d moa_train configs pyproject.toml`, the commit before the redesign.
# Processes old / new / new / old (order balanced), each compiling into an empty inductor cache
# folder of its own (TORCHINDUCTOR_CACHE_DIR) that keeps its kernels' sources (*.py) and the launch
# configurations autotuning chose (*.best_config), so that a gap can be told apart from a pick
# (paths_2026-12-07c/RUN.md: at batch 1, moas_kv's figure followed one kernel's pick, old and new
# alike). About 4 minutes a process. Then, optional: two moas_kv processes with coordinate-descent
# tuning (wait for them with the marker done_cd, below).
# Started in its own process session, which runs on while the machine stays warm; each call waits:
#   start: setsid bash docs/results/runs/inference/paths_next.sh W > W.out 2>&1 < /dev/null &
#   then:  bash docs/results/runs/inference/paths_next.sh --wait W SECONDS OUT   (call again at once)
#   the optional part: bash docs/results/runs/inference/paths_next.sh --wait W SECONDS OUT done_cd
set -uo pipefail
MODELS=mha,gqa,moas_dynamic,moa_sparse
if [ "$1" = --wait ]; then  # wait up to SECONDS for the run to end, then pack what it wrote
  w=$2 secs=$3 out=$4 marker=${5:-done}  # done_cd: wait for the optional part's end instead
  for _ in $(seq "$secs"); do [ -f "$w/$marker" ] && break; sleep 1; done
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
old() {  # the packages .gpu/activate.sh installs are under /tmp/site
  (cd .base && TORCHINDUCTOR_CACHE_DIR="$w/inductor_old$1" PYTHONPATH=/tmp/site:$PWD timeout 480 \
    python3 -m moa_train.bench --decode --no-hf --no-trace --models "$MODELS" --out "$w/old$1") \
    >> "$w/old$1.log" 2>&1
  keep_picks "$w/inductor_old$1"
}
new() {
  TORCHINDUCTOR_CACHE_DIR="$w/inductor_new$1" timeout 480 python3 -m moa_train.bench --decode \
    --no-paths --no-hf --no-trace --models "$MODELS" --out "$w/new$1" >> "$w/new$1.log" 2>&1
  keep_picks "$w/inductor_new$1"
}
cd_tuned() {  # optional, last: moas_kv with coordinate-descent tuning (gpt-fast turns it on): does
  # it steady the batch-1 pick of the pool softmax (912-1,207 tok/s over eight default compilations)?
  TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 TORCHINDUCTOR_CACHE_DIR="$w/inductor_cd$1" timeout 300 \
    python3 -m moa_train.bench --decode --no-paths --no-hf --no-trace --models moas_kv \
    --out "$w/cd$1" >> "$w/cd$1.log" 2>&1
  keep_picks "$w/inductor_cd$1"
}
stamp start
old 1; stamp "old 1"; new 1; stamp "new 1"; new 2; stamp "new 2"; old 2; stamp "old 2"
touch "$w/done"  # the target's measurement ends here; what follows runs while the machine stays warm
cd_tuned 1; stamp "cd 1"; cd_tuned 2; stamp "cd 2"; touch "$w/done_cd"
