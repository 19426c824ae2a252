"""One request of the write queue, sent so that what MLflow refuses for good is isolated.

A batch that MLflow refuses (server.write_errors.refusal) is split in halves until the refused
item(s) are alone; everything else is written and each refused item goes to the dead letter, so
later items and other runs keep flowing. A refusal may also mean the run itself is gone
(deleted, missing): then the run is marked dead in the registry and all its items are
dead-lettered without a request each. A transient error propagates to the writer, which backs
off; what was settled before it stays settled.
"""

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from fl_lightning_mlflow.server.dead_letter import DeadLetter
from fl_lightning_mlflow.server.queue_items import POINT_KINDS, Outcome
from fl_lightning_mlflow.server.run_registry import RunRegistry
from fl_lightning_mlflow.server.write_errors import Refused, refusal


class RequestSender:
    def __init__(self, write, runs: RunRegistry, dead_letter: DeadLetter, unknown_error_attempts: int):
        """write(items): sends one request (the queue's, so it can be instrumented)."""
        self.write, self.runs, self.dead_letter = write, runs, dead_letter
        self.unknown_error_attempts = max(1, unknown_error_attempts)
        self.client = None

    def send(self, batch: list, outcome: dict, checked_run: bool = False, isolate_unknown: bool = False) -> None:
        """Write batch [(position, item)]; outcomes go to outcome {position: Outcome}. isolate_unknown:
        the last allowed attempt: an error nobody can classify is isolated like a refusal."""
        first = batch[0][1]
        run_key = first.run_key if first.kind in POINT_KINDS else None
        if run_key is not None and run_key in self.runs.dead:
            for pos, item in batch:
                self._refuse(pos, item, self.runs.dead[run_key], "RUN_GONE", outcome)
            return
        try:
            self.write([item for _, item in batch])
        except Exception as e:  # noqa: BLE001 - classified below; transient ones go up to back off
            reason = refusal(e)
            if reason == "?" and isolate_unknown:
                reason = f"gave up after {self.unknown_error_attempts} attempts: {type(e).__name__}: {e}"
            if reason is None or reason == "?":
                raise
            if run_key is not None and not checked_run and self._run_gone(run_key):
                return self.send(batch, outcome, True, isolate_unknown)  # now dead: all dead-lettered
            if len(batch) == 1:
                code = getattr(e, "error_code", None) or type(e).__name__
                self._refuse(batch[0][0], batch[0][1], reason, code, outcome)
                return
            half = len(batch) // 2
            self.send(batch[:half], outcome, True, isolate_unknown)
            self.send(batch[half:], outcome, True, isolate_unknown)
            return
        for pos, _ in batch:
            outcome[pos] = Outcome.WRITTEN

    def write_items(self, items: list, actions: dict) -> None:
        """One request: an action (actions[name](client, *args)), or one run's points as one log_batch."""
        first = items[0]
        if first.kind == "call":
            if first.name not in actions:
                raise Refused(f"no action named {first.name!r}")
            actions[first.name](self.client, *first.args)
            return
        run_id = self.runs.run_id(first.run_key)
        metrics = [Metric(i.key, float(i.value), int(i.timestamp), int(i.step)) for i in items if i.kind == "metric"]
        # Identical params in one batch are sent once: MLflow refuses a key twice in a batch.
        params = [Param(k, v) for k, v in dict.fromkeys((i.key, i.value) for i in items if i.kind == "param")]
        tags = [RunTag(i.key, i.value) for i in items if i.kind == "tag"]
        self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def _run_gone(self, run_key) -> bool:
        """After a refusal: is the run itself deleted or missing?"""
        run_id = self.runs.ids.get(run_key)
        try:
            stage = self.client.get_run(run_id).info.lifecycle_stage
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                return False
            stage = "missing"
        if stage == "active":
            return False
        self.runs.mark_dead(run_key, f"run {run_id} is {stage} in MLflow")
        return True

    def _refuse(self, pos, item, reason, code, outcome: dict) -> None:
        outcome[pos] = Outcome.REFUSED
        run_key = item.run_key if item.kind in POINT_KINDS else None
        self.dead_letter.record(item, self.runs.ids.get(run_key) if run_key is not None else None, reason, code)
