#!/usr/bin/env bash
# SwitchHead transplant check in one device call, from the project root, the released files carried
# beside the working tree (they are not committed: .released/ is git-ignored):
#   .released/switchhead/{switchhead.py,cvmm.py,__init__.py} = RobertCsordas/switchhead @
#   0bb2f61d55bed44ce2e99b5164c9d84554a3b020 (2024-09-28), switchhead/*
# Device call: run(command='MOA_GIT_SHA=<commit> bash docs/results/runs/transplant_switchhead_call.sh "$OUT"',
#                  carry=['.released', '.gpu'])
# Writes OUT/transplant_switchhead_2026-12-06.txt (header + the script's output) and OUT/exit.txt; commit the .txt
# as docs/results/runs/transplant_switchhead_2026-12-06.txt.
set -uo pipefail
out=${1:-$OUT}
mkdir -p "$out"
[ -f .gpu/activate.sh ] && source .gpu/activate.sh
export MOA_GIT_SHA=${MOA_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null)}
rec="$out/transplant_switchhead_2026-12-06.txt"
{
  echo "# SwitchHead transplant check, $(date -u +%F)"
  echo "# command: PYTHONPATH=. python scripts/transplant_switchhead.py --released-dir .released/switchhead"
  echo "#   .released/switchhead: RobertCsordas/switchhead @ 0bb2f61d55bed44ce2e99b5164c9d84554a3b020, switchhead/{switchhead,cvmm}.py"
  echo "# moa_train at ${MOA_GIT_SHA:-unknown}; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "# python $(python3 -c 'import sys; print(sys.version.split()[0])'); triton $(python3 -c 'import triton; print(triton.__version__)' 2>&1 | tail -1)"
  echo
} > "$rec"
PYTHONPATH=.:${PYTHONPATH:-} timeout 480 python3 scripts/transplant_switchhead.py \
  --released-dir .released/switchhead >> "$rec" 2>&1
echo "exit $?" | tee "$out/exit.txt" >> "$rec"
cat "$rec"
