#!/usr/bin/env bash
# Run the job in FLARE's POC mode: real server and site processes on this machine.
#   scripts/poc.sh [--workspace DIR] [--sites N] [--job NAME] [--rounds R] [--epochs E] [--offline]
#     [--data-root DIR] [--tracking-uri URI] [--credentials FILE] [--timeout S] [--job-id ID]
#     [--site-policy SITE=FILE] [--venv DIR] prepare|start|submit|wait|download|stop|clean|status|run|resume
# All but --venv are `flctl poc`'s options (--help says what each command does).
set -euo pipefail
source "$(dirname "$0")/common.sh"
take_venv "$@"
run_flctl poc "${ARGS[@]+"${ARGS[@]}"}"
