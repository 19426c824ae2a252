#!/usr/bin/env bash
# Create the project's virtual environment and install its pinned packages.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: scripts/setup.sh [--dev] [--postgres] [--venv DIR]

Creates a Python virtual environment (default: $REPO_ROOT/.venv, or \$VENV) and installs
requirements.txt (with --dev, requirements-dev.txt: adds pytest and ruff). Idempotent: it
does nothing when the environment already matches the requirements. Writes nothing outside
the environment folder apart from pip's cache. --postgres also installs PostgreSQL and iproute2 from
the system's packages (apt-get, as root) when they are missing: the deployment rehearsal's
tracking server stores its runs in PostgreSQL, and its hosts are network namespaces (ip netns).
USAGE
}

dev=0 postgres=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1; shift ;;
    --postgres) postgres=1; shift ;;
    --venv) need_value "$1" $#; VENV="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# The rehearsal's system packages: PostgreSQL, and iproute2 for `ip netns` (slim images lack it).
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v ip >/dev/null || missing+=(iproute2)
if [ "$postgres" = 1 ] && [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "${missing[*]} missing; installing needs root (apt-get install -y ${missing[*]})"
  command -v apt-get >/dev/null || die "${missing[*]} missing and there is no apt-get; install them yourself"
  echo "setup: installing ${missing[*]} (the system's packages) for the deployment rehearsal"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine's package lists may be empty or stale: update once, then install.
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } \
    || die "apt-get install ${missing[*]} failed"
fi

reqs="$REPO_ROOT/requirements.txt"
[ "$dev" = 1 ] && reqs="$REPO_ROOT/requirements-dev.txt"
python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "$python not found; install Python 3.10+ or set PYTHON"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "Python 3.10+ needed, found $("$python" --version)"

stamp="$VENV/.requirements-stamp"
digest() { cat "$REPO_ROOT/requirements.txt" "$1" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1; }
want="$(digest "$reqs")"
have="$(cat "$stamp" 2>/dev/null || true)"
# An environment set up with the dev requirements also holds the runtime ones.
if [ -n "$have" ] && { [ "$have" = "$want" ] || [ "$have" = "$(digest "$REPO_ROOT/requirements-dev.txt")" ]; }; then
  echo "setup: $VENV is up to date"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV"
  "$python" -m venv "$VENV" || die "could not create a virtual environment at $VENV"
fi
echo "setup: installing $(basename "$reqs") into $VENV (torch alone is several GB the first time)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip || die "pip upgrade failed"
"$VENV/bin/python" -m pip install --quiet -r "$reqs" || die "pip install -r $reqs failed"
# The project's own packages (custom/), editable: scripts, tests and benchmarks import them.
"$VENV/bin/python" -m pip install --quiet --no-deps -e "$REPO_ROOT" || die "pip install -e $REPO_ROOT failed"
echo "$want" > "$stamp"
echo "setup: done"
