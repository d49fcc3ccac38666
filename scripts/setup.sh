#!/usr/bin/env bash
# Set-up on a fresh machine: torch where none is installed, then this package (editable) with optional extras.
#   bash scripts/setup.sh          # the package
#   bash scripts/setup.sh dev,sweep   # + test tools and the Optuna sweeper (what CI installs)
# torch==2.13.0 is asked for by version so that machines carrying a local CPU build take it (an unpinned torch
# would pull the CUDA build, several GB); an already installed torch (e.g. a GPU image's 2.11) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0
fi
extras=${1:-}
"$py" -m pip install -q -e ".${extras:+[$extras]}"
