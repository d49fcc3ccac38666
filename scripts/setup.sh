#!/usr/bin/env bash
# Set-up on a fresh machine: torch where none is installed, then this package (editable) with optional extras.
#   bash scripts/setup.sh            # the package
#   bash scripts/setup.sh dev,sweep  # + test tools (launchers, W&B) and the Optuna sweeper (what CI installs)
#   bash scripts/setup.sh wandb      # an extra added later gets the same pinned versions
#   MOA_DATA_DIR=/data bash scripts/setup.sh   # + records /data as the data folder, so later commands need no
#                                              # MOA_DATA_DIR (../shared/data beside the checkout is found without)
# constraints/ci.txt pins the extras' tools to the versions CI runs with (python3 scripts/pin_constraints.py
# upgrades them); the runtime dependencies keep pyproject.toml's ranges.
# torch==2.13.0 is asked for by version so that machines carrying a local CPU build take it (an unpinned torch
# would pull the CUDA build, several GB); an already installed torch (e.g. a GPU image's 2.11) is kept.
set -euo pipefail
py=${PYTHON:-python3}
data_dir=${MOA_DATA_DIR:+$("$py" -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "$MOA_DATA_DIR")}
cd "$(dirname "$0")/.."
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0
fi
extras=${1:-}
"$py" -m pip install -q -c constraints/ci.txt -e ".${extras:+[$extras]}"
# the data folder: recorded once where MOA_DATA_DIR is given (~/.config/moa_train/data_dir); either way, say where
# data will be read from (python3 -m moa_train.data --set-root DIR records another later)
"$py" -m moa_train.data ${data_dir:+--set-root "$data_dir"}
