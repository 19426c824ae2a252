#!/usr/bin/env bash
# Set up, prepare data and run a job (default hello-lightning-mlflow) in the FLARE simulator.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: scripts/run_simulator.sh [options]

Runs jobs/hello-lightning-mlflow (or --job NAME) in the FLARE simulator: creates the virtual environment
if needed (scripts/setup.sh), prepares the data and the per-site split if needed
(scripts/prepare_data.sh), runs the job, then prints the final global model's test
accuracy, where the MLflow data is, and the mlflow ui command to view it.

  --job NAME|DIR      job folder under jobs/ (default hello-lightning-mlflow; or hello-pt-mlflow),
                      or the path of a job folder of your own
  --offline           use the offline dataset (generated here) instead of downloading CIFAR-10
  --sites N           number of sites (default 2)
  --rounds R          FL rounds (default 2)
  --epochs E          local epochs per round (default 1)
  --alpha A           Dirichlet non-IID split with concentration A (default: IID)
  --seed S            split seed (default 0)
  --data-root DIR     data folder (default /tmp/nvflare/data/cifar10 or .../offline-cifar10)
  --workspace DIR     where runs go (default /tmp/nvflare/hello-lightning-mlflow); each run
                      gets its own folder DIR/runs/<time>, and DIR/latest points to it
  --tracking-uri URI  MLflow tracking URI, e.g. sqlite:////abs/mlflow.db or http://127.0.0.1:5000
                      (default: mlflow.db inside the server's job workspace)
  --experiment NAME   MLflow experiment name (default: the job's, e.g. hello-lightning-mlflow)
  --threads T         sites the simulator runs at once (default: all of them)
  --gpu IDS           GPU ids for the simulator's -gpu option, e.g. 0
  --venv DIR          virtual environment (default $VENV)

The job's own folder is never edited: the run uses a configured copy, which
flctl check checks (configs, class paths, data of every site) before anything starts.
USAGE
}

job_name=hello-lightning-mlflow offline=0 sites=2 rounds=2 epochs=1 alpha="" seed=0 data_root="" workspace=/tmp/nvflare/hello-lightning-mlflow
tracking_uri="" experiment="" threads="" gpu=""
while [ $# -gt 0 ]; do
  case "$1" in
    --job) need_value "$1" $#; job_name="$2"; shift 2 ;;
    --offline) offline=1; shift ;;
    --sites) need_value "$1" $#; sites="$2"; shift 2 ;;
    --rounds) need_value "$1" $#; rounds="$2"; shift 2 ;;
    --epochs) need_value "$1" $#; epochs="$2"; shift 2 ;;
    --alpha) need_value "$1" $#; alpha="$2"; shift 2 ;;
    --seed) need_value "$1" $#; seed="$2"; shift 2 ;;
    --data-root) need_value "$1" $#; data_root="$2"; shift 2 ;;
    --workspace) need_value "$1" $#; workspace="$2"; shift 2 ;;
    --tracking-uri) need_value "$1" $#; tracking_uri="$2"; shift 2 ;;
    --experiment) need_value "$1" $#; experiment="$2"; shift 2 ;;
    --threads) need_value "$1" $#; threads="$2"; shift 2 ;;
    --gpu) need_value "$1" $#; gpu="$2"; shift 2 ;;
    --venv) need_value "$1" $#; VENV="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
for pair in "sites:$sites" "rounds:$rounds" "epochs:$epochs"; do
  [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die "--${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
if [ -f "$job_name/meta.json" ]; then # a path to a job folder of your own
  job_src="$(realpath "$job_name")"
  job_name="$(basename "$job_src")"
else
  job_src="$REPO_ROOT/jobs/$job_name"
  [ -f "$job_src/meta.json" ] || die "no job folder jobs/$job_name or $job_name (see ls jobs/)"
fi
threads="${threads:-$sites}"
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer, got '$threads'"
if [ -z "$data_root" ]; then
  data_root=/tmp/nvflare/data/cifar10
  [ "$offline" = 1 ] && data_root=/tmp/nvflare/data/offline-cifar10
fi
data_root="$(realpath -m "$data_root")"
workspace="$(realpath -m "$workspace")"

started=$(date +%s)
bash "$REPO_ROOT/scripts/setup.sh" --venv "$VENV"
activate_venv

# Prepare data only when the split on disk is not the one asked for.
split_matches() {
  python3 - "$data_root/splits/split_info.json" "$sites" "${alpha:-null}" "$seed" <<'PY'
import json, sys
path, sites, alpha, seed = sys.argv[1:]
try:
    info = json.load(open(path))
except OSError:
    sys.exit(1)
alpha = None if alpha == "null" else float(alpha)
sys.exit(0 if (info["sites"], info["alpha"], info["seed"]) == (int(sites), alpha, int(seed)) else 1)
PY
}
if ! split_matches; then
  prep=(--data-root "$data_root" --sites "$sites" --seed "$seed" --venv "$VENV")
  [ -n "$alpha" ] && prep+=(--alpha "$alpha")
  [ "$offline" = 1 ] && prep+=(--offline)
  bash "$REPO_ROOT/scripts/prepare_data.sh" "${prep[@]}"
else
  echo "data: using the existing $sites-site split in $data_root/splits"
fi

run_dir="$workspace/runs/$(date +%Y%m%d-%H%M%S)-$$" # two runs in one second do not share a folder
mkdir -p "$run_dir"
ln -sfn "$run_dir" "$workspace/latest"
job="$run_dir/job/$job_name"
settings=(
  "server.num_rounds=$rounds" "server.min_clients=$sites" "meta.min_clients=$sites"
  "client.local_epochs=$epochs" "client.data_root=$data_root"
)
[ -n "$tracking_uri" ] && settings+=("server.tracking_uri=$tracking_uri")
[ -n "$experiment" ] && settings+=("server.experiment_name=$experiment")
python -m flctl.configure "$job_src" "$job" "${settings[@]}" \
  || die "could not configure the job"
python -m flctl.check_job "$job" --sites "$sites" \
  || die "the job has the problem(s) above; nothing was started (job copy: $job)"

sim_ws="$run_dir/simulator"
sim=(nvflare simulator "$job" -n "$sites" -t "$threads" -w "$sim_ws")
[ -n "$gpu" ] && sim+=(-gpu "$gpu")
echo "running: ${sim[*]}"
echo "(log: $run_dir/simulator.log)"
"${sim[@]}" 2>&1 | tee "$run_dir/simulator.log" | grep --line-buffered -E "round [0-9]+:|aggregating|new best|ERROR" || true
[ "${PIPESTATUS[0]}" = 0 ] || die "the simulator failed; see $run_dir/simulator.log"

server_dir="$sim_ws/server/simulate_job"
model="$server_dir/app_server/FL_global_model.pt"
[ -f "$model" ] || die "no global model was written ($model); see $run_dir/simulator.log"
read -r acc n_test < <(python -m flctl.evaluate "$model" "$data_root") \
  || die "could not evaluate $model"
rounds_done=$(grep -c "aggregating .* update(s) at round" "$run_dir/simulator.log" || true)
[ "$rounds_done" = "$rounds" ] || die "only $rounds_done of $rounds rounds were aggregated; see $run_dir/simulator.log"

echo
echo "done in $(( $(date +%s) - started )) s: $job_name, $sites sites x $rounds rounds x $epochs epoch(s)"
echo "final global model test accuracy: $acc on $n_test held-out images"
echo "global models:  $model"
[ -f "$server_dir/app_server/best_FL_global_model.pt" ] && echo "                $server_dir/app_server/best_FL_global_model.pt"
stats="$server_dir/mlflow_tracking_stats.json"
[ -f "$stats" ] && python - "$stats" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
lost = sum(s["lost"].values())
print(f"MLflow runs:     status {s['status']}; {sum(s['written'].values())} items written, {lost} lost"
      + (f" (see {sys.argv[1]})" if lost else ""))
PY
if [ -z "$tracking_uri" ]; then
  echo "MLflow database: $server_dir/mlflow.db"
  echo "view it with:    mlflow ui --backend-store-uri sqlite:///$server_dir/mlflow.db"
else
  echo "MLflow tracking: $tracking_uri"
  case "$tracking_uri" in
    sqlite:*) echo "view it with:    mlflow ui --backend-store-uri $tracking_uri" ;;
    *) echo "view it at:      $tracking_uri" ;;
  esac
fi
