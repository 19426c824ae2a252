"""What a continuation of a dead job needs to know, read from what the dead job left behind.

A job whose FL server died left, in its folder on the server (the simulator's simulate_job, a
POC or production server's <job_id>):
  - the journal's state.json (journal.py): run ids, experiment, tracking URI, job uid, sites and
    the last completed round (saved at ROUND_DONE, after the persistor wrote that round's model);
  - app_server/FL_global_model.pt (and best_FL_global_model.pt once a best round was found),
    which PTFileModelPersistor rewrites after every round;
  - mlflow_tracking_stats.json only when the job ended by itself (the tracker's finalize).
MLflow (after recovery: recovery.py) holds everything the dead job accepted, so it is asked
for the two things the journal's state does not keep: the last step of each site's run (a
continuing site's step axis must go on after it) and the best round so far by the key metric
(the selector and the champion must weigh every round, before the crash and after).

The plan is a plain dict (it travels inside the continuation job's config): nothing here knows
FLARE. Every refusal is ResumeRefused with one line saying what is missing.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from fl_lightning_mlflow.common.protocol import PARENT_RUN_KEY, STATS_FILE
from fl_lightning_mlflow.server.journal import JOURNAL_DIR, load_state

APP_SERVER = "app_server"
MODEL_FILE, BEST_MODEL_FILE = "FL_global_model.pt", "best_FL_global_model.pt"
# The dead job's models as the continuation job carries them in app/custom (they travel with the job).
RESUME_MODEL, RESUME_BEST_MODEL = "resume_FL_global_model.pt", "resume_best_FL_global_model.pt"


class ResumeRefused(Exception):
    """Nothing to resume, or not yet: one line naming what is missing and where."""


@dataclass
class DeadJob:
    run_dir: Path  # the dead job's folder on the FL server
    state: dict  # its journal's state.json
    model: Path  # its last persisted global model
    best_model: Path | None  # its best global model so far, if a best round was found

    @property
    def last_round(self) -> int:
        return int(self.state["last_round"])

    @property
    def recovered(self) -> bool:
        """Its tracking was written out and its runs ended (recovery.py ends a dead job's journal)."""
        return bool(self.state.get("ended"))


def read_stats(run_dir) -> dict | None:
    try:
        stats = json.loads((Path(run_dir) / STATS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def dead_job(run_dir, num_rounds: int | None = None, need_runs: bool = True) -> DeadJob:
    """The dead job in run_dir, or ResumeRefused saying why there is nothing to resume.
    num_rounds: the job's total, when known (a job that completed all its rounds is not resumed).
    need_runs False: before recovery, which may still create the runs from the journal."""
    run_dir = Path(run_dir)
    state = load_state(run_dir / JOURNAL_DIR)
    if not state.get("job_uid"):
        raise ResumeRefused(f"{run_dir}: no tracking journal ({JOURNAL_DIR}/state.json): not a job this tracker ran")
    job = state.get("job_id") or run_dir.name
    stats = read_stats(run_dir)
    if stats is not None and stats.get("status") == "FINISHED":
        raise ResumeRefused(f"job {job} finished (its runs are FINISHED): nothing to resume")
    if need_runs and (PARENT_RUN_KEY not in (state.get("run_ids") or {}) or not state.get("experiment_id")):
        raise ResumeRefused(f"job {job}: its MLflow runs were never created: nothing to continue into")
    last = state.get("last_round")
    if not isinstance(last, int) or isinstance(last, bool):
        raise ResumeRefused(f"job {job}: no round completed before its FL server stopped: start the job again instead")
    if num_rounds is not None and last + 1 >= num_rounds:
        raise ResumeRefused(f"job {job}: all {num_rounds} rounds completed before its server stopped: nothing to train")
    model = run_dir / APP_SERVER / MODEL_FILE
    if not model.is_file():
        raise ResumeRefused(f"job {job}: no persisted global model ({model})")
    best = run_dir / APP_SERVER / BEST_MODEL_FILE
    return DeadJob(run_dir, state, model, best if best.is_file() else None)


# ----- what MLflow holds -------------------------------------------------------------------------
def last_step(client, run_id: str) -> int | None:
    """The highest step of any metric of the run, or None when it has none."""
    keys = list(client.get_run(run_id).data.metrics)
    steps = [m.step for key in keys for m in client.get_metric_history(run_id, key)]
    return max(steps) if steps else None


def step_offsets(client, run_ids: dict) -> dict:
    """{site: the first step a continuation may write}: after the last step MLflow holds, so no
    step is written twice and none goes back (0 for a site run with no metric yet)."""
    out = {}
    for key, run_id in sorted(run_ids.items()):
        if key == PARENT_RUN_KEY:
            continue
        last = last_step(client, run_id)
        out[key] = 0 if last is None else last + 1
    return out


def best_so_far(client, parent_id: str, key_metric: str | None, mode: str, last_round: int) -> list | None:
    """[round, value] of the best round up to last_round by the key metric on the parent run (step =
    round), as the model selector chose it: round 0 is never a best (FLARE's selector skips it),
    and only a strictly better value replaces the best (the first of equal ones stays)."""
    if not key_metric:
        return None
    best = None
    points = sorted((m.step, m.value) for m in client.get_metric_history(parent_id, key_metric))
    for fl_round, value in points:
        if not 1 <= fl_round <= last_round or not math.isfinite(value):
            continue
        better = best is None or (value < best[1] if mode == "min" else value > best[1])
        if better:
            best = [fl_round, value]
    return best


def make_plan(dead: DeadJob, client, key_metric: str | None, mode: str, num_rounds: int) -> dict:
    """The continuation's plan: the tracker's resume_from (server.continuation reads it)."""
    state = dead.state
    run_ids = dict(state["run_ids"])
    return {
        "job_id": state.get("job_id") or dead.run_dir.name,
        "job_uid": state["job_uid"],
        "job_name": state.get("job_name", ""),
        "experiment_id": state["experiment_id"],
        "experiment_name": state.get("experiment_name", ""),
        "tracking_uri": state.get("tracking_uri", ""),
        "run_ids": run_ids,
        "sites": list(state.get("sites") or []),
        "last_round": dead.last_round,
        "start_round": dead.last_round + 1,
        "num_rounds": int(num_rounds),
        "step_offsets": step_offsets(client, run_ids),
        "best": best_so_far(client, run_ids[PARENT_RUN_KEY], key_metric, mode, dead.last_round),
        "key_metric": key_metric,
        "key_metric_mode": mode,
    }
