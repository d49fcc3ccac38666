#!/usr/bin/env bash
# Issue 27's measurements of 2026-12-07 (call 12; it was paths_next.sh until it ran; records in
# paths_2026-12-07d/, RUN.md): the benchmark's compiled figure before and after the redesign, in one
# call, for the target rows whose before/after was missing or stale: mha, gqa and moa_sparse (call 1,
# 2026-12-06, measured them while the new step still copied the logits out of the graph; gqa b64
# 0.949) and moas_dynamic with its top1 row (never measured). moas_kv's before/after is in
# paths_2026-12-07c/ (eight fresh compilations).
# From the project root on the GPU machine after `source .gpu/activate.sh`, with `.gpu` and `.base`
# carried ON EVERY CALL (a call without them removes them from the device's copy). .base = `git
# archive 75d305d moa_train configs pyproject.toml`, the commit before the redesign.
# Processes old / new / new / old (order balanced), each compiling into an empty inductor cache
# folder of its own (TORCHINDUCTOR_CACHE_DIR) that keeps its kernels' sources (*.py) and the launch
# configurations autotuning chose (*.best_config), so that a gap can be told apart from a pick.
# About 2.5 minutes a process. Then, optional: two moas_kv processes with coordinate-descent tuning
# (wait for them with the marker done_cd, below).
# CAUTION (learnt by this run, RUN.md): each call's start copies the working tree and the carried
# paths onto the device again, replacing them; a process still reading .base (or the tree) at that
# moment can find a file missing. Old 2's last model (moa_sparse) failed so, as the second call began.
# Started in its own process session, which runs on while the machine stays warm; each call waits:
#   start: setsid bash docs/results/runs/inference/paths_2026-12-07d.sh W > W.out 2>&1 < /dev/null &
#   then:  bash docs/results/runs/inference/paths_2026-12-07d.sh --wait W SECONDS OUT   (call again at once)
#   the optional part: bash docs/results/runs/inference/paths_2026-12-07d.sh --wait W SECONDS OUT done_cd
set -uo pipefail
MODELS=mha,gqa,moas_dynamic,moa_sparse
BASE_SHA=75d305dbd784dfb801044330addce47e8c1c850b  # what .base holds, for the old jsons' git_sha
source "$(dirname "$0")/driver_common.sh"
if [ "$1" = --wait ]; then wait_and_pack "${@:2}"; exit 0; fi  # done_cd: the optional part's end
w=$1
start_records
old() {  # the packages .gpu/activate.sh installs are under /tmp/site
  (cd .base && MOA_GIT_SHA=$BASE_SHA TORCHINDUCTOR_CACHE_DIR="$w/inductor_old$1" \
    PYTHONPATH=/tmp/site:$PWD timeout 480 \
    python3 -m moa_train.bench --decode --no-hf --no-trace --models "$MODELS" --out "$w/old$1") \
    >> "$w/old$1.log" 2>&1
  keep_picks "$w/inductor_old$1"
}
new_bench() {  # NAME MODELS [VAR=VALUE ...]: the new code's benchmark, compiled into inductor_NAME
  local name=$1 models=$2
  shift 2
  env "$@" TORCHINDUCTOR_CACHE_DIR="$w/inductor_$name" timeout 480 python3 -m moa_train.bench \
    --decode --no-paths --no-hf --no-trace --models "$models" --out "$w/$name" >> "$w/$name.log" 2>&1
  keep_picks "$w/inductor_$name"
}
new() { new_bench "new$1" "$MODELS"; }
# optional, last: moas_kv with coordinate-descent tuning (gpt-fast turns it on): does it steady the
# batch-1 pick of the pool softmax (912-1,207 tok/s over eight default compilations)?
cd_tuned() { new_bench "cd$1" moas_kv TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1; }
stamp start
old 1; stamp "old 1"; new 1; stamp "new 1"; new 2; stamp "new 2"; old 2; stamp "old 2"
touch "$w/done"  # the target's measurement ends here; what follows runs while the machine stays warm
cd_tuned 1; stamp "cd 1"; cd_tuned 2; stamp "cd 2"; touch "$w/done_cd"
