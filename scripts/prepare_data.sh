#!/usr/bin/env bash
# Fetch CIFAR-10 once (or generate the offline dataset) and write one split file per site.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: scripts/prepare_data.sh [options]

  --data-root DIR   shared data folder (default /tmp/nvflare/data/cifar10,
                    or /tmp/nvflare/data/offline-cifar10 with --offline)
  --sites N         number of sites to split the training set over (default 2)
  --alpha A         Dirichlet concentration for a non-IID split (default: IID)
  --seed S          split seed (default 0); the same seed gives the same split
  --val-fraction F  share of each site's data kept for validation (default 0.1)
  --offline         generate a small learnable dataset in CIFAR-10's layout instead of
                    downloading CIFAR-10 (for machines without internet)
  --venv DIR        virtual environment to use (default $VENV)

Writes DIR/cifar-10-batches-py/ (once) and DIR/splits/site-<i>.json (each time, replacing
the previous split). Nothing is written outside DIR.
USAGE
}

data_root="" sites=2 alpha="" seed=0 val=0.1 offline=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data-root) need_value "$1" $#; data_root="$2"; shift 2 ;;
    --sites) need_value "$1" $#; sites="$2"; shift 2 ;;
    --alpha) need_value "$1" $#; alpha="$2"; shift 2 ;;
    --seed) need_value "$1" $#; seed="$2"; shift 2 ;;
    --val-fraction) need_value "$1" $#; val="$2"; shift 2 ;;
    --offline) offline=1; shift ;;
    --venv) need_value "$1" $#; VENV="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ "$sites" =~ ^[1-9][0-9]*$ ]] || die "--sites must be a positive integer, got '$sites'"
if [ -z "$data_root" ]; then
  data_root=/tmp/nvflare/data/cifar10
  [ "$offline" = 1 ] && data_root=/tmp/nvflare/data/offline-cifar10
fi

activate_venv
args=(--data-root "$data_root" --sites "$sites" --seed "$seed" --val-fraction "$val")
[ -n "$alpha" ] && args+=(--alpha "$alpha")
[ "$offline" = 1 ] && args+=(--offline)
python -m flctl.data_prep "${args[@]}" || die "data preparation failed (see above)"
