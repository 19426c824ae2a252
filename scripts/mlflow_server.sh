#!/usr/bin/env bash
# A local MLflow tracking server with MLflow's basic-auth app, for the FL server to write to.
#   scripts/mlflow_server.sh [--dir DIR] [--port PORT] [--venv DIR] start|stop|status
# All but --venv are `flctl mlflow-server`'s options (--help says more). Then:
#   scripts/poc.sh --tracking-uri http://127.0.0.1:PORT --credentials DIR/credentials run
set -euo pipefail
source "$(dirname "$0")/common.sh"
take_venv "$@"
run_flctl mlflow-server "${ARGS[@]+"${ARGS[@]}"}"
