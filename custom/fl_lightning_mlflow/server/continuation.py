"""The tracker's side of a resumed job: the same MLflow runs go on, as if the crash had not been.

A continuation job (built by flctl from a dead job, resume_plan.make_plan) gives the tracker a
plan as `resume_from`. With it the tracker
  - opens its write queue with the dead job's run ids, experiment and job uid, so no run is
    created twice: a site that was in the dead job writes into its own run again, a new site
    gets a new child run under the same parent;
  - sets those runs back to RUNNING (a "reopen" call through the queue, so it is journaled and
    retried like any write) with tags naming the continuation and the job it resumes;
  - shifts each continuing site's steps past the last step MLflow holds for that site (the new
    site processes count from 0 again), so every series keeps increasing;
  - carries the best round so far into its summary (the champion weighs every round) and the
    best model file into its app folder (logged as the best even if no later round beats it);
  - counts rounds from the job's start: the workflow's num_rounds is the rounds left.
The global metrics need nothing: their step is the round, and the rounds go on.
"""

import shutil
from pathlib import Path

from fl_lightning_mlflow.common.protocol import PARENT_RUN_KEY
from fl_lightning_mlflow.server.resume_plan import BEST_MODEL_FILE, RESUME_BEST_MODEL

REOPEN = "reopen"  # the write queue's action (mlflow_sink registers it)
# Tags on the reopened runs: the latest continuation and the job it continued.
CONTINUED_BY_TAG, RESUMES_TAG, RESUMED_AFTER_TAG = "continued_by_job", "resumes_job", "resumed_after_round"
INTERRUPTED_TAG = "interrupted"  # what recovery's failure_reason said, kept once the run goes on
PLAN_KEYS = ("job_uid", "run_ids", "experiment_id", "start_round", "num_rounds", "step_offsets")


class ContinuationError(ValueError):
    """A resume_from that is not a plan flctl made (one line)."""


def reopen_run(client, run_id: str) -> None:
    """Set a run ended by recovery back to RUNNING; recovery's failure_reason becomes `interrupted`
    (the run may yet end FINISHED). Idempotent: a retry after a lost reply does the same."""
    run = client.get_run(run_id)
    reason = run.data.tags.get("failure_reason")
    if reason is not None:
        client.set_tag(run_id, INTERRUPTED_TAG, reason)
        client.delete_tag(run_id, "failure_reason")
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


class Continuation:
    def __init__(self, plan: dict):
        if not isinstance(plan, dict) or any(key not in plan for key in PLAN_KEYS):
            missing = [k for k in PLAN_KEYS if not isinstance(plan, dict) or k not in plan]
            raise ContinuationError(f"resume_from must be the plan flctl resume writes; missing {missing}")
        self.plan = plan
        self.start_round = int(plan["start_round"])
        self.num_rounds = int(plan["num_rounds"])
        self.offsets = {str(k): int(v) for k, v in (plan.get("step_offsets") or {}).items()}
        self.best = tuple(plan["best"]) if plan.get("best") else None

    def sink_state(self) -> dict:
        """What MLflowSink takes as `resume`: the dead job's runs, its uid and its rounds."""
        keys = ("job_uid", "job_id", "sites", "run_ids", "experiment_id", "tracking_uri", "last_round")
        return {k: self.plan.get(k) for k in keys}

    def start(self, sink, summary, app_dir, job_id: str, sites) -> list:
        """Right after the sink started (its setup finds the runs by id): reopen the runs of the
        sites that came back, and the parent; seed the summary; place the best model. Returns
        the sites of the dead job that did not come back: the sink (started with this job's sites)
        leaves their runs as recovery ended them, FAILED."""
        run_ids = self.plan["run_ids"]
        back = [site for site in sites if site in run_ids]
        for key in [PARENT_RUN_KEY, *back]:
            sink.queue.put(("call", REOPEN, [key]))
            sink.tags(key, [(CONTINUED_BY_TAG, job_id)])
        sink.tags(PARENT_RUN_KEY, [(RESUMES_TAG, self.plan.get("job_id", "")),
                                   (RESUMED_AFTER_TAG, self.start_round - 1)])  # fmt: skip
        summary.num_rounds, summary.rounds_done = self.num_rounds, self.start_round
        if self.best is not None:
            summary.best = self.best
        self._place_best_model(Path(app_dir))
        return [site for site in run_ids if site != PARENT_RUN_KEY and site not in sites]

    def round_started(self, summary) -> None:
        """The workflow says the rounds left; the job's own total is what the runs report."""
        summary.num_rounds = self.num_rounds

    def shift(self, site: str, points: list) -> list:
        """A continuing site's points [(name, value, step)] moved past its steps before the crash."""
        offset = self.offsets.get(site, 0)
        return [(key, value, step + offset) for key, value, step in points] if offset else points

    @staticmethod
    def _place_best_model(app_dir: Path) -> None:
        """The dead job's best model where the persistor would have written it (a later best
        replaces it): the best model logged at the end is the best of every round."""
        carried, target = app_dir / "custom" / RESUME_BEST_MODEL, app_dir / BEST_MODEL_FILE
        if carried.is_file() and not target.exists():
            shutil.copyfile(carried, target)
