#!/usr/bin/env bash
# The multi30k_fairseq rows (mha, moa, moa_sparse x seeds 0-2) re-run with the faithful keys of the
# second fidelity pass, every run at once on one GPU, from the project root after
# `source .gpu/activate.sh`. Each run is stopped with a checkpoint (SIGTERM) before LIMIT and resumes
# from its folder (trainer.resume=auto) when this script is called again on the same warm machine;
# finished runs are skipped. The same moa-train command per run as
# `scripts/rerun_multi30k_fairseq.sh --jobs 9 trainer.precision=bf16 trainer.tf32=true` (and as the
# 2026-12-01 records: docs/results/runs/translation/launch_2026-12-01.sh). When all nine are done,
# OUT gets records.tgz (the run folders without checkpoints, laid out as
# docs/results/runs/translation/multi30k_fairseq/), to unpack here and rebuild the tables with
# `python3 scripts/reproduce_translation.py --tables-only`.
#   MOA_GIT_SHA=<commit> bash docs/results/runs/translation/call_fairseq_2026-12-07.sh OUT [LIMIT]
set -uo pipefail
out=$1; limit=${2:-540}
root=outputs/calls/translation
export MOA_DATA_DIR=${MOA_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1
mkdir -p "$out" "$root/multi30k_fairseq"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt" || echo none > "$out/gpu.txt"
date -u +%FT%T >> "$out/times.txt"
for row in mha moa moa_sparse; do
  for seed in 0 1 2; do
    dir=$root/multi30k_fairseq/$row-seed$seed
    [ -f "$dir/summary.json" ] && continue
    timeout -s TERM "$limit" python3 -m moa_train experiment=multi30k_fairseq/$row trainer.seed=$seed \
      trainer.precision=bf16 trainer.tf32=true hydra.run.dir="$dir" >> "$dir.log" 2>&1 &
  done
done
wait
date -u +%FT%T >> "$out/times.txt"

for f in "$root"/multi30k_fairseq/*.log; do
  d=${f%.log}
  if [ -f "$d/summary.json" ]; then echo "done $d"; else echo "NOT DONE $d"; tail -2 "$f"; fi
done | tee "$out/status.txt"
tar -czf "$out/records.tgz" --exclude=checkpoints -C "$root" multi30k_fairseq
cat "$out/times.txt"
