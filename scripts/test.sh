#!/usr/bin/env bash
# Set up the environment (from nothing if needed), then lint and run the test suite.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: scripts/test.sh [--fast] [--venv DIR] [-- PYTEST_ARGS...]

Creates/updates the virtual environment with the dev requirements (scripts/setup.sh --dev),
runs ruff check and ruff format --check, then pytest. --fast skips the slow end-to-end
simulator tests. Tests write only to pytest's temporary folders and need no network.
USAGE
}

fast=0 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --fast) fast=1; shift ;;
    --venv) need_value "$1" $#; VENV="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# As root (CI), the slow suite rehearses a deployment in network namespaces: PostgreSQL too.
pg=()
[ "$fast" = 0 ] && [ "$(id -u)" = 0 ] && pg=(--postgres)
bash "$REPO_ROOT/scripts/setup.sh" --dev "${pg[@]+"${pg[@]}"}" --venv "$VENV"
activate_venv
cd "$REPO_ROOT"
echo "== ruff check"; ruff check . || die "ruff check failed"
echo "== ruff format --check"; ruff format --check . || die "ruff format --check failed (run: ruff format .)"
args=(-q --durations=15)
[ "$fast" = 1 ] && args+=(-m "not slow")
echo "== pytest ${args[*]} ${extra[*]:-}"
set +e
python -m pytest "${args[@]}" "${extra[@]}"
rc=$?
set -e
[ "$rc" = 5 ] && die "pytest collected no tests"
[ "$rc" = 0 ] || die "pytest failed (exit $rc)"
