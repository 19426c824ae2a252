#!/usr/bin/env bash
# A local MLflow tracking server with MLflow's basic-auth app, for the FL server to write to.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: scripts/mlflow_server.sh [--dir DIR] [--port PORT] start|stop|status

  start    start 'mlflow server --app-name basic-auth' on 127.0.0.1:PORT (SQLite backend store
           DIR/mlflow.db, artifacts in DIR/artifacts, users in DIR/auth.db). On the first start
           it creates a random admin password and a Flask secret key, kept in DIR/credentials and
           DIR/server.env, both readable by their owner only (mode 600). Idempotent.
  stop     stop it (by the PID in DIR/server.pid, with every worker it started)
  status   say whether it runs, and where

  --dir DIR    server folder (default /tmp/nvflare/mlflow-server)
  --port PORT  port (default 5000)
  --venv DIR   virtual environment (default $VENV)

Give the FL server the credentials, and only the FL server:
  scripts/poc.sh --tracking-uri http://127.0.0.1:PORT --credentials DIR/credentials run
DIR/credentials holds MLFLOW_TRACKING_USERNAME=... and MLFLOW_TRACKING_PASSWORD=... lines.
USAGE
}

dir=/tmp/nvflare/mlflow-server port=5000 command=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) need_value "$1" $#; dir="$2"; shift 2 ;;
    --port) need_value "$1" $#; port="$2"; shift 2 ;;
    --venv) need_value "$1" $#; VENV="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$command" ] || die "one command at a time"; command="$1"; shift ;;
  esac
done
[ -n "$command" ] || die "no command given (see --help)"
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "--port must be 1-65535, got '$port'"
dir="$(realpath -m "$dir")"
pid_file="$dir/server.pid"
uri="http://127.0.0.1:$port"

running_pid() { # the PID in the PID file, if that process is alive and is this folder's server
  local pid
  pid=$(cat "$pid_file" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "sqlite:///$dir/mlflow.db" || return 1
  echo "$pid"
}

drop_stale_pid_file() { # after a crash: the PID file names a dead process, or one that is not ours
  if [ -f "$pid_file" ] && ! running_pid >/dev/null; then
    echo "mlflow-server: removing stale PID file $pid_file (PID $(head -c 20 "$pid_file" | tr -d '\n') is not this server)"
    rm -f "$pid_file"
  fi
}

healthy() { curl -sf -o /dev/null --max-time 2 "$1/health"; }

cmd_start() {
  if pid=$(running_pid); then
    echo "mlflow-server: already running (PID $pid) at $(cat "$dir/uri")"
    return 0
  fi
  drop_stale_pid_file
  activate_venv
  mkdir -p "$dir/artifacts"
  (
    umask 077 # secrets: owner only
    if [ ! -f "$dir/credentials" ]; then
      password=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')
      printf 'MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=%s\n' "$password" >"$dir/credentials"
      printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s/auth.db\nadmin_username = admin\nadmin_password = %s\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
        "$dir" "$password" >"$dir/auth.ini"
      printf 'MLFLOW_FLASK_SERVER_SECRET_KEY=%s\n' "$(python -c 'import secrets; print(secrets.token_hex(32))')" >"$dir/server.env"
      echo "mlflow-server: created an admin password in $dir/credentials (mode 600)"
    fi
  )
  chmod 600 "$dir/credentials" "$dir/auth.ini" "$dir/server.env"
  if healthy "$uri"; then die "something else already answers on $uri"; fi
  # Secrets reach the server through its environment and files, never its command line.
  (
    set -a
    source "$dir/server.env"
    set +a
    export MLFLOW_AUTH_CONFIG_PATH="$dir/auth.ini"
    exec setsid mlflow server --app-name basic-auth --backend-store-uri "sqlite:///$dir/mlflow.db" \
      --artifacts-destination "$dir/artifacts" --host 127.0.0.1 --port "$port" --workers 1 \
      >"$dir/server.log" 2>&1 </dev/null
  ) &
  echo $! >"$pid_file"
  echo "$uri" >"$dir/uri"
  for _ in $(seq 1 180); do
    if healthy "$uri"; then
      echo "mlflow-server: running (PID $(cat "$pid_file")) at $uri; credentials in $dir/credentials"
      return 0
    fi
    kill -0 "$(cat "$pid_file")" 2>/dev/null || die "the server exited; see $dir/server.log"
    sleep 0.5
  done
  cmd_stop >/dev/null
  die "the server did not answer on $uri within 90 s; see $dir/server.log"
}

cmd_stop() {
  local pid
  if ! pid=$(running_pid); then
    rm -f "$pid_file"
    echo "mlflow-server: not running"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pid_file"
  echo "mlflow-server: stopped"
}

cmd_status() {
  if pid=$(running_pid); then
    echo "mlflow-server: running (PID $pid) at $(cat "$dir/uri")"
  else
    echo "mlflow-server: not running"
    return 3
  fi
}

case "$command" in
  start|stop|status) "cmd_$command" ;;
  *) die "unknown command '$command' (see --help)" ;;
esac
