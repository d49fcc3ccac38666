# Shared by the inference drivers of docs/results/runs/inference/ (from paths_2026-12-07d.sh on;
# the dated drivers before it carry their own copy, as they ran). Sourced after `set -uo
# pipefail`; the functions below but wait_and_pack write into the records folder "$w".

# wait_and_pack W SECONDS OUT [MARKER]: wait up to SECONDS for W/MARKER (default done, written when
# the driver ends), then pack W and its terminal output into OUT/paths.tgz and print the logs'
# result lines and the times.
wait_and_pack() {
  local w=$1 secs=$2 out=$3 marker=${4:-done}
  for _ in $(seq "$secs"); do [ -f "$w/$marker" ] && break; sleep 1; done
  tar -czf "$out/paths.tgz" -C "$(dirname "$w")" "$(basename "$w")" "$(basename "$w").out"
  for f in "$w"/*.log; do echo "== $f"; grep -h "batch\|failed\|error" "$f" | tail -n 12; done
  cat "$w/times.txt"
}

# start_records: the records folder, with the card's name and driver
start_records() {
  mkdir -p "$w"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$w/gpu.txt"
}

stamp() { echo "$(date -u +%T) $1" >> "$w/times.txt"; }

keep_picks() {  # an inductor cache folder, less all but its kernels' sources and chosen configs
  find "$1" -type f ! -name '*.best_config' ! -name '*.py' -delete
}
