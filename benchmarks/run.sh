#!/usr/bin/env bash
# Run the benchmarks from nothing: set up the environment, then benchmarks/run_benchmarks.py.
#   benchmarks/run.sh [--quick] [--out DIR] [--sections overhead,write_path,accuracy] [--venv DIR]
#   benchmarks/run.sh --summary RESULTS_JSON   (a results file's tables; runs nothing)
# --quick runs small workloads once; the full run takes 1 to 1.5 hours on 2 cores; --help says more.
set -euo pipefail
source "$(dirname "$0")/../scripts/common.sh"
take_venv "$@"
wants_help || bash "$REPO_ROOT/scripts/setup.sh" --venv "$VENV"
activate_venv
exec python "$REPO_ROOT/benchmarks/run_benchmarks.py" "${ARGS[@]+"${ARGS[@]}"}"
