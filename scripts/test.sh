#!/usr/bin/env bash
# Set up the environment (from nothing if needed), then lint and run the test suite.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: scripts/test.sh [--fast] [--venv DIR] [-- PYTEST_ARGS...]

Creates/updates the virtual environment with the dev requirements (scripts/setup.sh --dev),
runs ruff check and ruff format --check, then pytest: the unit tests in parallel (pytest-xdist,
up to 4 workers), then the slow end-to-end tests one at a time. --fast skips the slow ones.
With PYTEST_ARGS, one pytest run of that selection. Tests write only to pytest's temporary
folders and need no network.
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
run_pytest() {  # one pytest run; "collected no tests" (exit 5) is a failure too
  echo "== pytest $*"
  set +e
  python -m pytest "$@"
  local rc=$?
  set -e
  [ "$rc" = 5 ] && die "pytest collected no tests ($*)"
  [ "$rc" = 0 ] || die "pytest failed (exit $rc)"
}
if [ ${#extra[@]} -gt 0 ]; then  # the caller's selection, in one run
  args=(-q --durations=15)
  [ "$fast" = 1 ] && args+=(-m "not slow")
  run_pytest "${args[@]}" "${extra[@]}"
  exit 0
fi
# The unit tests on every core (up to 4 workers); the end-to-end ones after, one at a time: they
# run FLARE's simulator, POC and servers that want the machine's cores to themselves.
run_pytest -q -m "not slow" -n auto --maxprocesses=4 --durations=10
[ "$fast" = 1 ] || run_pytest -q -m slow --durations=15
