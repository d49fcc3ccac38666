#!/usr/bin/env bash
# Issue 34's and issue 32's trainings in one device call (device time is scarce), from the project
# root with `.gpu` and `.released` carried:
#   - docs/results/runs/call34_2026-12-07.sh: the SwitchHead check (9 runs) and the MLA rows of the
#     KV trade-off study (6 runs);
#   - docs/results/runs/translation/call_fairseq_2026-12-07.sh: the multi30k_fairseq rows (9 runs);
#   - docs/results/runs/transplant_switchhead_call.sh: the SwitchHead transplant check on CUDA;
# all at once on the one GPU, each training stopped with a checkpoint before LIMIT seconds and resumed
# when this script is called again on the same warm machine. Everything they write is packed into
# OUT/call.tgz (what comes back from a device call is at most 8 files).
#   MOA_GIT_SHA=<commit> bash docs/results/runs/call_2026-12-07.sh OUT [LIMIT]
set -uo pipefail
out=$1; limit=${2:-500}
source .gpu/activate.sh
work=/tmp/call_2026-12-07; mkdir -p "$work"
date -u +%FT%T > "$work/start.txt"
bash docs/results/runs/call34_2026-12-07.sh "$work/call34" "$limit" > "$work/call34.out" 2>&1 &
bash docs/results/runs/translation/call_fairseq_2026-12-07.sh "$work/fairseq" "$limit" \
  > "$work/fairseq.out" 2>&1 &
[ -f "$work/transplant/exit.txt" ] || bash docs/results/runs/transplant_switchhead_call.sh \
  "$work/transplant" > "$work/transplant.out" 2>&1 &
wait
date -u +%FT%T > "$work/end.txt"
tar -czf "$out/call.tgz" -C /tmp call_2026-12-07
tail -30 "$work/call34.out"; tail -15 "$work/fairseq.out"; tail -20 "$work/transplant.out"
