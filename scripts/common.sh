# Shared by the scripts in this folder; sourced, not run.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}

need_value() { # option, remaining-arg-count
  [ "$2" -ge 2 ] || die "option $1 needs a value"
}

activate_venv() {
  [ -x "$VENV/bin/python" ] || die "no virtual environment at $VENV (run scripts/setup.sh)"
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
}
