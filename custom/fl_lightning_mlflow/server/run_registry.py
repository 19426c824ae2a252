"""Which MLflow runs the write path writes to: one owner for the run ids, the experiment and the
runs MLflow will never take items for.

The sink's actions fill it in as they create runs (or a recovery from the journal's state); the
writer asks it for a run's id before each request. Nothing else keeps a copy.
"""

import logging

from fl_lightning_mlflow.server.tracking_uri import redact_uri
from fl_lightning_mlflow.server.write_errors import Refused, RunNotReady


class RunRegistry:
    def __init__(self, run_ids: dict | None = None, experiment_id: str | None = None, logger=None):
        self.ids: dict = dict(run_ids or {})  # run key -> MLflow run id
        self.experiment_id = experiment_id
        self.dead: dict = {}  # run key -> why MLflow will never take its items (deleted, not created)
        self.log = logger or logging.getLogger(__name__)

    def run_id(self, run_key) -> str:
        """The run's id; Refused if it can never exist, RunNotReady if it is not created yet."""
        if run_key in self.dead:
            raise Refused(self.dead[run_key])
        if run_key not in self.ids:
            raise RunNotReady(f"no MLflow run for {run_key!r} yet")
        return self.ids[run_key]

    def add(self, run_key, run_id: str) -> None:
        self.ids[run_key] = run_id

    def mark_dead(self, run_key, reason: str) -> None:
        """No item of this run can ever be written (its run was deleted, or MLflow refused to
        create it): its items go to the dead letter without being sent."""
        if run_key not in self.dead:
            self.dead[run_key] = reason
            self.log.error(f"MLflow refuses every write to {run_key!r}: {redact_uri(reason)}")

    def live(self, run_key) -> bool:
        """The run exists and takes items."""
        return run_key in self.ids and run_key not in self.dead
