#!/usr/bin/env bash
# Fetch CIFAR-10 once (or generate the offline dataset) and write one split file per site.
#   scripts/prepare_data.sh [--data-root DIR] [--sites N] [--alpha A] [--seed S]
#     [--val-fraction F] [--offline] [--venv DIR]
# All but --venv are `flctl prepare-data`'s options (--help lists them).
set -euo pipefail
source "$(dirname "$0")/common.sh"
take_venv "$@"
run_flctl prepare-data "${ARGS[@]+"${ARGS[@]}"}"
