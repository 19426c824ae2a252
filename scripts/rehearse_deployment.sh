#!/usr/bin/env bash
# Rehearse a provisioned, TLS-secured deployment on this machine, one network namespace per host
# (FL server, sites, admin, MLflow on PostgreSQL reachable from the FL server alone):
#   scripts/rehearse_deployment.sh [--folder DIR] [--sites N] [--rounds R] [--epochs E]
#     [--timeout S] [--no-compare] [--site-policy SITE=FILE] [--teardown] [--venv DIR]
# All but --venv are `flctl rehearse`'s options (--help says more). Needs root.
set -euo pipefail
source "$(dirname "$0")/common.sh"
take_venv "$@"
if ! wants_help; then
  [ "$(id -u)" = 0 ] || die "needs root to create network namespaces (run it as root or with sudo)"
  # The venv, and PostgreSQL from the system's packages when it is missing.
  bash "$REPO_ROOT/scripts/setup.sh" --postgres --venv "$VENV"
fi
# flctl ends what it started itself, by PID and by namespace name, on failure and on
# Ctrl-C/SIGTERM too; a run killed outright is cleaned up by the next one (or --teardown).
run_flctl rehearse "${ARGS[@]+"${ARGS[@]}"}"
