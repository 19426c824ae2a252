#!/usr/bin/env bash
# Run the job in FLARE's POC mode: real server and site processes on this machine.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: scripts/poc.sh [options] COMMAND

Commands (each can run alone; 'run' does the whole cycle):
  prepare    create the POC workspace for --sites sites (replaces an earlier one)
  start      start the FL server, then the sites; only the server gets MLflow credentials.
             Says so and does nothing when all are running; after a crash, stops what is
             left and clears stale PID files first
  submit     configure a copy of the job, check it (flctl check), submit it
             (nvflare job submit); prints the job id
  wait       wait for the submitted job (--timeout) and fail unless it finished OK; if the FL
             server goes away meanwhile, say so, stop the sites and fail
  download   download the job's result (MLflow data, models, logs) into WORKSPACE/results
  stop       stop the server and sites; kills any of their processes still alive after that
  clean      stop, then delete the POC workspace
  status     list the POC processes that are running
  run        prepare, start, submit, wait, download, stop (stops on failure too)

Options:
  --workspace DIR     everything goes here (default /tmp/nvflare/poc-hello); nvflare's CLI config,
                      which nvflare writes to \$HOME/.nvflare/config.conf, goes to DIR/home/.nvflare
                      instead, so your own ~/.nvflare is never touched
  --sites N           number of sites (default 2)
  --job NAME          job under jobs/ (default hello-lightning-mlflow)
  --rounds R          FL rounds (default 2)        --epochs E   local epochs (default 1)
  --offline           offline dataset (default data root /tmp/nvflare/data/offline-cifar10)
  --data-root DIR     data folder (prepared with scripts/prepare_data.sh if its split does not match)
  --tracking-uri URI  MLflow tracking URI for the FL server (default: SQLite in the server's job folder)
  --credentials FILE  file with MLFLOW_TRACKING_USERNAME=... and MLFLOW_TRACKING_PASSWORD=... lines
                      (e.g. from scripts/mlflow_server.sh); exported to the FL server process only
  --timeout S         seconds to wait for the job (default 1800)
  --job-id ID         job for wait/download (default: the last one submitted from this workspace)
  --venv DIR          virtual environment (default $VENV)
USAGE
}

workspace=/tmp/nvflare/poc-hello sites=2 job_name=hello-lightning-mlflow rounds=2 epochs=1 offline=0
data_root="" tracking_uri="" credentials="" timeout=1800 job_id="" command=""
while [ $# -gt 0 ]; do
  case "$1" in
    --workspace) need_value "$1" $#; workspace="$2"; shift 2 ;;
    --sites) need_value "$1" $#; sites="$2"; shift 2 ;;
    --job) need_value "$1" $#; job_name="$2"; shift 2 ;;
    --rounds) need_value "$1" $#; rounds="$2"; shift 2 ;;
    --epochs) need_value "$1" $#; epochs="$2"; shift 2 ;;
    --offline) offline=1; shift ;;
    --data-root) need_value "$1" $#; data_root="$2"; shift 2 ;;
    --tracking-uri) need_value "$1" $#; tracking_uri="$2"; shift 2 ;;
    --credentials) need_value "$1" $#; credentials="$2"; shift 2 ;;
    --timeout) need_value "$1" $#; timeout="$2"; shift 2 ;;
    --job-id) need_value "$1" $#; job_id="$2"; shift 2 ;;
    --venv) need_value "$1" $#; VENV="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$command" ] || die "one command at a time (got '$command' and '$1')"; command="$1"; shift ;;
  esac
done
[ -n "$command" ] || die "no command given (see --help)"
for pair in "sites:$sites" "rounds:$rounds" "epochs:$epochs" "timeout:$timeout"; do
  [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die "--${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
[ -f "$REPO_ROOT/jobs/$job_name/meta.json" ] || die "no job folder jobs/$job_name"
if [ -z "$data_root" ]; then
  data_root=/tmp/nvflare/data/cifar10
  [ "$offline" = 1 ] && data_root=/tmp/nvflare/data/offline-cifar10
fi
workspace="$(realpath -m "$workspace")"
data_root="$(realpath -m "$data_root")"
poc_ws="$workspace/poc"
export NVFLARE_POC_WORKSPACE="$poc_ws"
export HOME="$workspace/home"  # nvflare's CLI config lands here, not in the user's home
kit="$poc_ws/example_project/prod_00/admin@nvidia.com"
site_names() { for i in $(seq 1 "$sites"); do echo "site-$i"; done; }

activate_venv
mkdir -p "$HOME"

poc_re=$(printf '%s' "$poc_ws" | sed 's/[][\.*^$+?(){}|]/\\&/g') # the path as a literal in pgrep's regex

poc_pids() { # every process whose command line names this POC workspace
  pgrep -f -- "$poc_re/" || true
}

part_pids() { # processes of one POC participant (server, site-1, ...): its daemon, its process, its jobs
  pgrep -f -- "$poc_re/example_project/prod_00/$1( |/|\$)" || true
}

all_parts_running() {
  local part
  for part in server $(site_names); do
    [ -n "$(part_pids "$part")" ] || return 1
  done
}

clear_stale_pid_files() { # after a crash: FLARE's start script refuses to start when the PID in a
  # leftover daemon_pid.fl now belongs to another process, and a leftover shutdown.fl stops it at once
  [ -z "$(poc_pids)" ] || return 0
  local count
  count=$(find "$poc_ws/example_project/prod_00" -maxdepth 2 \( -name daemon_pid.fl -o -name pid.fl \
    -o -name shutdown.fl -o -name restart.fl \) -print -delete 2>/dev/null | wc -l)
  [ "$count" = 0 ] || echo "poc: removed $count stale PID/control file(s) left by an earlier run"
}

cmd_prepare() {
  mkdir -p "$workspace"
  if [ -n "$(poc_pids)" ]; then cmd_stop; fi
  nvflare poc prepare -n "$sites" --force >"$workspace/prepare.log" 2>&1 \
    || die "nvflare poc prepare failed; see $workspace/prepare.log"
  rm -f "$workspace/last_job_id" # a job of the old workspace is not in this one
  echo "poc: workspace for $sites site(s) in $poc_ws (nvflare CLI config: $HOME/.nvflare/config.conf)"
}

cmd_start() {
  [ -d "$kit" ] || die "no POC workspace in $poc_ws (run: scripts/poc.sh prepare)"
  if [ -n "$(poc_pids)" ]; then
    if all_parts_running; then
      echo "poc: already running ($(poc_pids | wc -l) processes)"
      return 0
    fi
    echo "poc: the server or a site of an earlier start is gone; stopping what is left, then starting afresh"
    cmd_stop
  fi
  clear_stale_pid_files
  if [ -n "$credentials" ]; then
    [ -r "$credentials" ] || die "cannot read credentials file $credentials"
    grep -qE '^MLFLOW_TRACKING_(USERNAME|PASSWORD|TOKEN)=' "$credentials" \
      || die "no MLFLOW_TRACKING_* lines in $credentials"
  fi
  # The server alone gets the credentials, exported inside a subshell: never on a command line
  # (visible in ps) and never in the environment of the sites, which start without any.
  (
    unset MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD MLFLOW_TRACKING_TOKEN
    if [ -n "$credentials" ]; then
      while IFS='=' read -r key value || [ -n "$key" ]; do # the last line may lack a newline
        case "$key" in
          MLFLOW_TRACKING_USERNAME|MLFLOW_TRACKING_PASSWORD|MLFLOW_TRACKING_TOKEN) export "$key=$value" ;;
        esac
      done <"$credentials"
    fi
    exec nvflare poc start -p server >"$workspace/start-server.log" 2>&1
  ) || { cmd_stop; die "the FL server did not start; see $workspace/start-server.log"; }
  local site_args=()
  for s in $(site_names); do site_args+=(-p "$s"); done
  # Sites share this machine's cores: tell each how many run here.
  env -u MLFLOW_TRACKING_USERNAME -u MLFLOW_TRACKING_PASSWORD -u MLFLOW_TRACKING_TOKEN FL_SITES_PER_HOST="$sites" \
    nvflare poc start "${site_args[@]}" >"$workspace/start-sites.log" 2>&1 \
    || { cmd_stop; die "the sites did not start; see $workspace/start-sites.log"; }
  echo "poc: server and $sites site(s) running ($(poc_pids | wc -l) processes)"
}

cmd_submit() {
  [ -n "$(poc_pids)" ] || die "the POC system is not running (run: scripts/poc.sh start)"
  local prep=(--data-root "$data_root" --sites "$sites" --venv "$VENV")
  [ "$offline" = 1 ] && prep+=(--offline)
  if ! python3 -c "import json,sys; sys.exit(json.load(open('$data_root/splits/split_info.json'))['sites'] != $sites)" 2>/dev/null; then
    bash "$REPO_ROOT/scripts/prepare_data.sh" "${prep[@]}"
  fi
  local job="$workspace/job/$job_name"
  local settings=(
    "server.num_rounds=$rounds" "server.min_clients=$sites" "meta.min_clients=$sites"
    "client.local_epochs=$epochs" "client.data_root=$data_root"
  )
  [ -n "$tracking_uri" ] && settings+=("server.tracking_uri=$tracking_uri")
  python -m flctl.configure "$REPO_ROOT/jobs/$job_name" "$job" "${settings[@]}" \
    || die "could not configure the job"
  python -m flctl.check_job "$job" --sites "$sites" --data-root "$data_root" \
    || die "the job has the problem(s) above; nothing was submitted (job copy: $job)"
  local out
  out=$(nvflare --format json job submit -j "$job" --startup-kit "$kit" 2>"$workspace/submit.log") \
    || die "job submit failed: $(tail -n 3 "$workspace/submit.log" | tr '\n' ' ')"
  job_id=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["data"]["job_id"])' <<<"$out") \
    || die "job submit gave no job id: $out"
  echo "$job_id" >"$workspace/last_job_id"
  echo "poc: submitted $job_name as job $job_id"
}

resolve_job_id() {
  [ -n "$job_id" ] || job_id=$(cat "$workspace/last_job_id" 2>/dev/null) || true
  [ -n "$job_id" ] || die "no job id (submit first, or give --job-id)"
}

cmd_wait() {
  resolve_job_id
  echo "poc: waiting for job $job_id (up to $timeout s)"
  local rc=0
  nvflare job wait "$job_id" --timeout "$timeout" --startup-kit "$kit" >"$workspace/wait.log" 2>&1 &
  waiter=$!
  # Watch the server meanwhile: if it is gone, nothing will ever finish the job.
  while kill -0 "$waiter" 2>/dev/null && [ -n "$(part_pids server)" ]; do
    sleep 2
  done
  if [ -z "$(part_pids server)" ]; then
    kill "$waiter" 2>/dev/null || true
    wait "$waiter" 2>/dev/null || true
    waiter=""
    echo "poc: the FL server stopped while job $job_id ran; stopping the sites" >&2
    cmd_stop >&2
    die "the FL server stopped during job $job_id; its log: $poc_ws/example_project/prod_00/server/log.txt"
  fi
  wait "$waiter" || rc=$?
  waiter=""
  case "$rc" in
    0) echo "poc: job $job_id finished: $(grep -m1 -i 'status' "$workspace/wait.log" | sed 's/^ *//')" ;;
    3) die "job $job_id did not finish within $timeout s" ;;
    *) die "job $job_id failed: $(grep -m1 -i 'status' "$workspace/wait.log" | sed 's/^ *//') (see $workspace/wait.log)" ;;
  esac
  [ -n "$(poc_pids)" ] || die "the POC system stopped while the job ran"
}

cmd_download() {
  resolve_job_id
  mkdir -p "$workspace/results"
  nvflare job download "$job_id" -o "$workspace/results" --force --startup-kit "$kit" >"$workspace/download.log" 2>&1 \
    || die "download of job $job_id failed; see $workspace/download.log"
  local result="$workspace/results/$job_id/workspace"
  echo "poc: results in $result"
  [ -f "$result/mlflow.db" ] && echo "view it with:    mlflow ui --backend-store-uri sqlite:///$result/mlflow.db"
  return 0
}

cmd_stop() {
  local pids
  if [ -d "$kit" ] && [ -n "$(part_pids server)" ]; then # graceful needs the server: it relays the stop
    nvflare poc stop >"$workspace/stop.log" 2>&1 || true
    for _ in $(seq 1 30); do
      [ -z "$(poc_pids)" ] && break
      sleep 1
    done
  fi
  pids=$(poc_pids)
  if [ -n "$pids" ]; then # whatever nvflare did not end: by PID, gently, then not
    kill $pids 2>/dev/null || true
    sleep 3
    pids=$(poc_pids)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  fi
  [ -z "$(poc_pids)" ] || die "POC processes still running: $(poc_pids | tr '\n' ' ')"
  echo "poc: stopped"
}

cmd_clean() {
  cmd_stop
  rm -rf "$poc_ws" "$workspace/job" "$workspace/last_job_id"
  echo "poc: removed $poc_ws"
}

cmd_status() {
  local pids
  pids=$(poc_pids)
  if [ -z "$pids" ]; then echo "poc: not running"; return 0; fi
  ps -o pid=,args= -p "$(echo $pids | tr ' ' ',')" | cut -c1-160
}

cmd_run() {
  local started
  started=$(date +%s)
  stop_on_exit=1
  cmd_prepare
  cmd_start
  cmd_submit
  cmd_wait
  cmd_download
  cmd_stop
  stop_on_exit=0
  echo "poc: whole cycle in $(( $(date +%s) - started )) s"
}

waiter="" stop_on_exit=0
on_exit() { # whatever way this script ends: no waiter left behind; after a failed 'run', nothing running
  [ -z "$waiter" ] || kill "$waiter" 2>/dev/null || true
  [ "$stop_on_exit" = 0 ] || cmd_stop >/dev/null 2>&1 || true
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

case "$command" in
  prepare|start|submit|wait|download|stop|clean|status|run) "cmd_$command" ;;
  *) die "unknown command '$command' (see --help)" ;;
esac
