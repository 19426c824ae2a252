"""Whether a FLARE job did what it was asked, from what it left behind, not from log wording.

The tracker's stats file (mlflow_tracking_stats.json in the server's job folder: "status" is
FINISHED only when every round ran, "written" and "lost" count MLflow items), FLARE's global
model files, and the rounds the tracker logged on the federation's MLflow run.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from fl_lightning_mlflow.common.protocol import PARENT_RUN_KEY as PARENT_KEY
from fl_lightning_mlflow.common.protocol import REGISTERED_MODEL_STATS_KEY, STATS_FILE

MODEL_FILE = "FL_global_model.pt"
BEST_MODEL_FILE = "best_FL_global_model.pt"
# Logged once per round on the federation's run (step = round), whatever the model measures.
ROUND_METRIC = "contributing_sites"  # fl_lightning_mlflow.server.summary.CONTRIBUTING_SITES


@dataclass
class Outcome:
    server_dir: Path
    model: Path | None = None
    best_model: Path | None = None
    stats: dict | None = None
    rounds_done: int | None = None
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def written(self) -> int:
        return sum((self.stats or {}).get("written", {}).values())

    @property
    def champion_uri(self) -> str | None:
        """models:/NAME@champion when the tracker registered the job's best model, else None."""
        registered = (self.stats or {}).get(REGISTERED_MODEL_STATS_KEY) or {}
        uris = registered.get("uris") if isinstance(registered, dict) else None
        return uris.get("champion") if isinstance(uris, dict) else None

    @property
    def lost(self) -> int:
        return sum((self.stats or {}).get("lost", {}).values())


def read_stats(server_dir) -> dict | None:
    try:
        stats = json.loads((Path(server_dir) / STATS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def rounds_logged(tracking_uri: str, stats: dict) -> int | None:
    """Points of the per-round global metric on the federation's run; None if unreadable."""
    run_id = (stats.get("run_ids") or {}).get(PARENT_KEY)
    if not run_id or not tracking_uri:
        return None
    try:
        from mlflow.tracking import MlflowClient

        return len(MlflowClient(tracking_uri).get_metric_history(run_id, ROUND_METRIC))
    except Exception:  # noqa: BLE001 - a store we cannot read: the stats' status still tells
        return None


def judge(server_dir, rounds: int, tracking_uri: str | None = None, app_dir: str | None = "app_server") -> Outcome:
    """server_dir: the server's job folder (simulate_job, or a downloaded job's workspace).
    tracking_uri: where the runs are (default: mlflow.db in server_dir)."""
    server_dir = Path(server_dir)
    out = Outcome(server_dir)
    models = server_dir / app_dir if app_dir else server_dir
    if (models / MODEL_FILE).is_file():
        out.model = models / MODEL_FILE
    else:
        out.problems.append(f"no global model was written ({models / MODEL_FILE})")
    if (models / BEST_MODEL_FILE).is_file():
        out.best_model = models / BEST_MODEL_FILE
    out.stats = read_stats(server_dir)
    if out.stats is None:
        out.problems.append(f"the tracker wrote no {STATS_FILE} in {server_dir}: it did not end the job")
        return out
    if out.stats.get("status") != "FINISHED":
        why = out.stats.get("failure") or "no reason given"
        out.problems.append(f"the job ended {out.stats.get('status')}: {why}")
    uri = tracking_uri or f"sqlite:///{server_dir / 'mlflow.db'}"
    out.rounds_done = rounds_logged(uri, out.stats)
    if out.rounds_done is not None and out.rounds_done != rounds:
        out.problems.append(f"only {out.rounds_done} of {rounds} rounds were aggregated")
    if out.lost:
        out.problems.append(
            f"MLflow: {out.lost} item(s) could not be written ({out.stats['lost']}); see {server_dir / STATS_FILE}"
        )
    return out
