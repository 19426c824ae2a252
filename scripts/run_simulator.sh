#!/usr/bin/env bash
# Set up, prepare data and run a job (default hello-lightning-mlflow) in the FLARE simulator:
#   scripts/run_simulator.sh [--job NAME|DIR] [--offline] [--sites N] [--rounds R] [--epochs E]
#     [--alpha A] [--seed S] [--data-root DIR] [--workspace DIR] [--tracking-uri URI]
#     [--experiment NAME] [--threads T] [--gpu IDS] [--venv DIR]
# All but --venv are `flctl simulate`'s options (--help lists them).
set -euo pipefail
source "$(dirname "$0")/common.sh"
take_venv "$@"
wants_help || bash "$REPO_ROOT/scripts/setup.sh" --venv "$VENV"
run_flctl simulate "${ARGS[@]+"${ARGS[@]}"}"
