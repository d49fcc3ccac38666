#!/usr/bin/env bash
# every Multi30k run at once on one GPU; each one is stopped (SIGTERM: it checkpoints) before the call's limit and
# resumes from its folder (trainer.resume=auto) when this script is run again; finished runs are skipped
LIMIT=${1:-520}
ROOT=outputs/gpu/translation
export MOA_DATA_DIR=${MOA_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1
mkdir -p $ROOT
for group in multi30k multi30k_fairseq; do
  for row in mha moa moa_sparse; do
    for seed in 0 1 2; do
      dir=$ROOT/$group/$row-seed$seed
      [ -f $dir/summary.json ] && continue
      mkdir -p $(dirname $dir)
      timeout -s TERM $LIMIT python3 -m moa_train experiment=$group/$row trainer.seed=$seed trainer.precision=bf16 \
        trainer.tf32=true hydra.run.dir=$dir >> $dir.log 2>&1 &
    done
  done
done
wait
for f in $ROOT/*/*.log; do d=${f%.log}; [ -f $d/summary.json ] && echo "done $d" || { echo "NOT DONE $d"; tail -3 $f; }; done
