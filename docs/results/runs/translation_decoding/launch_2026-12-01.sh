#!/usr/bin/env bash
# issue 18's GPU figures: one checkpoint per Multi30k row (seed 0, the modern recipe), trained at once on one GPU and
# resumed across device calls (SIGTERM checkpoints; trainer.resume=auto), then the test set decoded with and without
# the KV cache in fp32 and bf16 by scripts/time_translation_decoding.py
LIMIT=${1:-500}
ROOT=outputs/gpu/decoding
export MOA_DATA_DIR=${MOA_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1
mkdir -p $ROOT
for row in mha moa moa_sparse; do
  dir=$ROOT/$row
  [ -f $dir/summary.json ] && continue
  timeout -s TERM $LIMIT python3 -m moa_train experiment=multi30k/$row trainer.seed=0 trainer.precision=bf16 \
    trainer.tf32=true hydra.run.dir=$dir >> $dir.log 2>&1 &
done
wait
for row in mha moa moa_sparse; do [ -f $ROOT/$row/summary.json ] || { echo "NOT DONE $row"; tail -3 $ROOT/$row.log; exit 3; }; done
python3 scripts/time_translation_decoding.py $ROOT/mha $ROOT/moa $ROOT/moa_sparse --with-cudnn --out $ROOT/translation_decoding.json
