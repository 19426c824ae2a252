# Shared by the scripts in this folder; sourced, not run. The scripts are thin: the work is
# done by the flctl command line (custom/flctl), run inside the project's virtual environment.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}

need_value() { # option, remaining-arg-count
  [ "$2" -ge 2 ] || die "option $1 needs a value"
}

# take_venv "$@": VENV from --venv DIR; every other argument is kept, in order, in ARGS.
ARGS=()
take_venv() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --venv) need_value "$1" $#; VENV="$2"; shift 2 ;;
      --venv=*) VENV="${1#--venv=}"; shift ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
}

wants_help() {
  local arg
  for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
    case "$arg" in -h|--help) return 0 ;; esac
  done
  return 1
}

activate_venv() { # creates the environment first if there is none (scripts/setup.sh)
  [ -x "$VENV/bin/python" ] || bash "$REPO_ROOT/scripts/setup.sh" --venv "$VENV" || die "no virtual environment at $VENV"
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
}

# run_flctl SUBCOMMAND [ARGS...]: replaces this shell with `python -m flctl SUBCOMMAND ARGS...`.
run_flctl() {
  activate_venv
  if wants_help; then
    echo "$(basename "$0") runs 'flctl $1' in the virtual environment (--venv DIR, default $VENV)."
    echo
  fi
  exec python -m flctl "$@"
}
