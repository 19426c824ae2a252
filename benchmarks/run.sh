#!/usr/bin/env bash
# Run the benchmarks from nothing: set up the environment, then benchmarks/run_benchmarks.py.
set -euo pipefail
source "$(dirname "$0")/../scripts/common.sh"

usage() {
  cat <<USAGE
Usage: benchmarks/run.sh [--quick] [--out DIR] [--skip-scaling] [--venv DIR]

Measures, in one run on this machine: plain Lightning (the reference compute), the job in the
FLARE simulator with per-step tracking on and off, the MLflow write path alone (SQLite and a
local mlflow server it starts and stops), accuracy against centralized training, and scaling
with sites, rounds and data. --quick takes a few minutes; the full run about half an hour on
2 cores. Results (table, results.json, PNG plots) go to --out (default benchmarks/results/<time>).
USAGE
}

args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick|--skip-scaling) args+=("$1"); shift ;;
    --out) need_value "$1" $#; args+=(--out "$2"); shift 2 ;;
    --venv) need_value "$1" $#; VENV="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
bash "$REPO_ROOT/scripts/setup.sh" --venv "$VENV"
activate_venv
python "$REPO_ROOT/benchmarks/run_benchmarks.py" "${args[@]}"
