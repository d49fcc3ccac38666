#!/usr/bin/env bash
# SwitchHead's and MLA's small checks in one device call (machines are scarce), from the project
# root after `source .gpu/activate.sh`: the SwitchHead check's 9 runs
# (docs/results/runs/successors/call_switchhead_2026-12-06.sh) and the KV trade-off study's 6 MLA runs
# (docs/results/runs/kv_tradeoff/call_mla_2026-12-06.sh) at once on the one GPU, each under LIMIT
# seconds; their tables, logs and records.tgz under OUT/switchhead and OUT/mla. Both resume on a warm
# machine when called again (their runs live in git-ignored outputs/calls/).
#   MOA_GIT_SHA=<commit> bash docs/results/runs/call34_2026-12-07.sh OUT [LIMIT]
set -uo pipefail
out=$1; limit=${2:-520}
mkdir -p "$out/switchhead" "$out/mla"
bash docs/results/runs/successors/call_switchhead_2026-12-06.sh "$out/switchhead" "$limit" \
  > "$out/switchhead.out" 2>&1 &
bash docs/results/runs/kv_tradeoff/call_mla_2026-12-06.sh "$out/mla" "$limit" > "$out/mla.out" 2>&1 &
wait
tail -25 "$out/switchhead.out"; tail -25 "$out/mla.out"
