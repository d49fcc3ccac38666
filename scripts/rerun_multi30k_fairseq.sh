#!/usr/bin/env bash
# [GPU] Re-run the multi30k_fairseq rows (mha, moa, moa_sparse x seeds 0-2) with fairseq's batches, padding,
# accumulation and decoding limits (configs/experiment/_fairseq.yaml), keeping the tables of the previous runs
# beside the new ones so the change can be read off (docs/fidelity.md, "Multi30k schedule").
# Usage: bash scripts/rerun_multi30k_fairseq.sh [--jobs N] [moa-train overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
before=docs/results/translation_before_rerun
if [[ ! -e "$before.md" ]]; then
  cp docs/results/translation.md "$before.md"
  cp docs/results/translation.json "$before.json"
fi
python3 scripts/reproduce_translation.py --part multi30k_fairseq --seeds 3 "$@"
