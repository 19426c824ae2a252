"""The MLflow side of the server: what the tracker hands it becomes items of the WriteQueue.

One parent run per FL job (role=federation) and one nested child run per site (role=site,
mlflow.parentRunId: server.run_tree). Nothing here blocks its caller: every write is an item of
the queue, whose writer thread runs the "call" actions below (creating runs, logging models, the
cross-site table) and retries them like any point until the job ends. The stats file at the end
is server.stats_report's.

The actions are idempotent, because a request MLflow commits may still fail on the way back
(a lost reply) and is then retried: runs are looked up by their tags before they are created
(server.run_tree), and a registered model version is looked up by its tags before one is
registered (server.model_logger).
"""

import collections
import logging
import os
import threading
import uuid
from pathlib import Path

from fl_lightning_mlflow.common.protocol import MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH, PARENT_RUN_KEY, STATS_FILE
from fl_lightning_mlflow.server.continuation import REOPEN, reopen_run
from fl_lightning_mlflow.server.dataset_inputs import dataset_input
from fl_lightning_mlflow.server.journal import JOURNAL_DIR, save_state
from fl_lightning_mlflow.server.model_logger import JOB_UID_TAG, ModelLogger, versions
from fl_lightning_mlflow.server.run_tree import RunTree
from fl_lightning_mlflow.server.stats_report import write_report
from fl_lightning_mlflow.server.tracking_uri import redact_uri
from fl_lightning_mlflow.server.write_queue import DEAD_LETTER_FILE, WriteQueue

PARENT = PARENT_RUN_KEY  # the run key of the job's parent run; sites' run keys are their names

CROSS_SITE_TABLE = "cross_site_validation.json"
# Which run each action concerns (server.lanes): the index of its run key among its args, or the
# run itself; "setup" makes the whole tree, so everything waits for it.
CALL_LANES = {"child": 0, "log_inputs": 0, "log_table": 0, "log_text": 0, "terminate": 0, REOPEN: 0,
              "log_models": PARENT, "log_round_model": PARENT}  # fmt: skip


class MLflowSink:
    def __init__(self, tracking_uri, run_dir, experiment_name, models: ModelLogger, experiment_tags=None,
                 run_tags=None, description="", promote_params=(), logger=None, resume: dict | None = None,
                 requested_artifacts: bool = False, **queue_args):  # fmt: skip
        """queue_args: WriteQueue's max_memory_items, retry_initial, retry_max, sync_seconds.
        resume: recovery: the state.json of a journal in run_dir whose job is gone; the sink
        writes into that job's runs what its journal holds beyond the cursor."""
        self.experiment_name, self.models = experiment_name, models
        self.requested_artifacts = requested_artifacts  # the job named artifact_location itself
        self.experiment_tags = {str(k): str(v) for k, v in (experiment_tags or {}).items()}
        self.run_tags, self.description = dict(run_tags or {}), description
        self.promote_params, self._promoted = set(promote_params), set()
        self.run_dir, self.sites, self.job_id = Path(run_dir), [], ""
        self.job_uid = uuid.uuid4().hex  # this job start's runs, whatever the job id (simulator: always the same)
        self.log = logger or logging.getLogger(__name__)
        self.journal_dir, self.last_round, self.ended = self.run_dir / JOURNAL_DIR, None, False
        self._state_lock = threading.Lock()
        # The job's own tracking URI as its state recorded it, whatever URI a recovery was told to use.
        self.recorded_uri = (resume or {}).get("tracking_uri")
        if resume:
            self.job_uid, self.job_id = resume["job_uid"], resume.get("job_id", "")
            self.sites, self.last_round = list(resume.get("sites") or []), resume.get("last_round")
        actions = {
            "setup": lambda client, *args: self.tree.setup(client, *args),
            "child": lambda client, site: self.tree.child(client, site),
            "log_models": self._log_models,
            "log_round_model": self._log_round_model,
            "log_inputs": self._log_inputs,
            "log_table": self._log_table,
            "log_text": lambda client, key, text, path: client.log_text(self._run_id(key), text, path),
            "terminate": lambda client, key, status: client.set_terminated(self._run_id(key), status),
            REOPEN: lambda client, key: reopen_run(client, self._run_id(key)),  # a resumed job's runs
        }
        self.queue = WriteQueue(
            tracking_uri, self.journal_dir, actions, call_lanes=CALL_LANES, priority_run=PARENT, logger=logger,
            dead_letter_file=self.run_dir / DEAD_LETTER_FILE, resume=bool(resume),
            run_ids=(resume or {}).get("run_ids"), experiment_id=(resume or {}).get("experiment_id"), **queue_args,
        )  # fmt: skip
        self.tree = RunTree(self, self.queue.runs)
        self.save_state()

    @property
    def state_uri(self) -> str:
        """The URI the state file shows: the resumed job's own, else the write queue's (the one
        holder of the URI this sink writes to), without credentials."""
        return redact_uri(self.recorded_uri or self.queue.tracking_uri)

    def save_state(self) -> None:
        """What recovery needs, beside the journal (atomically replaced). Never raises. Called
        from FLARE's threads (rounds, sites) and the writer thread (run ids): one at a time."""
        with self._state_lock:
            try:
                self._save_state()
            except Exception as e:  # noqa: BLE001 - tracking goes on; recovery would have less to go by
                self.log.error(f"MLflow journal: could not save {self.journal_dir}/state.json: {e}")

    def _save_state(self) -> None:
        state = {
            "job_id": self.job_id,
            "job_uid": self.job_uid,
            "job_name": getattr(self, "job_name", ""),
            "experiment_name": self.experiment_name,
            "experiment_id": self.queue.runs.experiment_id,
            "tracking_uri": self.state_uri,
            "sites": self.sites,
            "run_ids": dict(self.queue.run_ids),
            "last_round": self.last_round,
            "model_spec": self.models.model_spec,  # recovery builds the logged models from it
            "model_input": self.models.input_spec,  # and gives them this input example
            "ended": self.ended,
            "pid": os.getpid(),
        }
        save_state(self.journal_dir, state)

    def round_done(self, fl_round) -> None:
        self.last_round = fl_round
        self.save_state()

    # ----- what the tracker queues (FLARE's threads: never waits on MLflow) --------------------
    def start(self, job_name, job_id, sites, tags, fl_params, artifacts=None):
        self.job_id, self.sites, self.job_name = job_id, list(sites), job_name
        self.save_state()
        tags = {**self.run_tags, "job_id": job_id, "sites": ",".join(self.sites), **versions(), **tags}
        tags[JOB_UID_TAG] = self.job_uid
        self.queue.put(("call", "setup", [job_name, artifacts, tags]))
        for key, value in fl_params.items():
            self.param(PARENT, key, value)

    def add_site(self, site):
        if site not in self.sites:  # a site that joined after the start gets its run now
            self.sites.append(site)
            self.queue.put(("call", "child", [site]))
            self.save_state()

    def metrics(self, run_key, points, now, step=None):
        """points: [(name, value, step)], or [(name, value)] all at `step`."""
        items = []
        for point in points:
            key, value, at = point if step is None else (*point, step)
            items.append(("metric", run_key, key, float(value), now, int(at)))
        self.queue.put_many(items)  # one journal write for the lot

    def param(self, run_key, key, value):
        self.queue.put(("param", run_key, key, str(value)[:MAX_PARAM_VALUE_LENGTH]))

    def site_params(self, site, pairs):
        for key, value in pairs:
            self.param(site, key, value)
            if key in self.promote_params and key not in self._promoted:  # shared settings, once on the parent
                self._promoted.add(key)
                self.param(PARENT, key, value)

    def tags(self, run_key, pairs):
        for key, value in pairs:
            self.queue.put(("tag", run_key, key, str(value)[:MAX_TAG_VALUE_LENGTH]))

    def text(self, run_key, text, path):
        self.queue.put(("call", "log_text", [run_key, str(text), str(path)]))

    def round_model(self, path, fl_round) -> None:
        """Round fl_round's global model, saved at path, as a LoggedModel at step fl_round (queued
        after the round's metrics, so MLflow links them to it)."""
        self.queue.put(("call", "log_round_model", [str(path), int(fl_round)]))

    def datasets(self, site, contexts) -> None:
        """contexts: [(context, JSON text)] checked by records.RecordChecker.datasets."""
        if contexts:
            self.queue.put(("call", "log_inputs", [site, [list(c) for c in contexts]]))

    def cross_site(self, points, rows, now):
        if rows:
            self.metrics(PARENT, points, now, step=0)
            self.queue.put(("call", "log_table", [PARENT, rows, CROSS_SITE_TABLE]))

    def finish(self, status, failure, site_status, models: tuple, flush_timeout) -> collections.Counter:
        """Queue the end (failure tag, models, statuses), write what can be written within
        flush_timeout seconds and return what could not. models: (final path, best path,
        (round, value) or None, the final model's step: the number of rounds done).
        Never raises: the runs' statuses and the stats file must follow."""
        try:
            if failure:
                self.tags(PARENT, [("failure_reason", failure)])
            final, best, best_info, *rest = models
            final_step = rest[0] if rest else None  # older callers: the final model is not logged
            if Path(final).is_file() or Path(best).is_file():
                register = status == "FINISHED"
                best_info = list(best_info or []) or None
                self.queue.put(("call", "log_models", [str(final), str(best), best_info, register, final_step]))
        except Exception as e:  # noqa: BLE001 - the models are optional; the statuses are not
            self.log.error(f"MLflow: could not queue the job's models: {type(e).__name__}: {e}")
        for site in self.sites:
            self.queue.put(("call", "terminate", [site, site_status.get(site, status)]))
        self.queue.put(("call", "terminate", [PARENT, status]))
        try:
            flushed = self.queue.drain(flush_timeout)
        except Exception:  # noqa: BLE001 - close() counts what is left
            flushed = False
        lost = self.queue.close(timeout=5 if flushed else 1)
        # The job ended here: recovery leaves this journal alone (what was not written is counted
        # lost in the stats file, and stays in the journal beyond the cursor for the record).
        self.ended = True
        self.save_state()
        return lost

    # ----- writer thread actions (idempotent: a failed attempt is retried whole) -----------------
    def _run_id(self, run_key) -> str:
        """The run id for an action on run_key: refused for good if the run can never exist."""
        return self.queue.runs.run_id(run_key)

    def _log_table(self, client, run_key, rows, artifact_file):
        names = ("model", "data_site", "metric", "value", "evaluated")  # evaluated: server.cross_site_eval's
        columns = {name: [r[name] for r in rows] for name in names if all(name in r for r in rows)}
        client.log_table(self._run_id(run_key), columns, artifact_file)

    def _log_models(self, client, final_path, best_path, best_info, register, final_step=None):
        parent_id, exp_id = self._run_id(PARENT), self.queue.runs.experiment_id
        self.models.log(
            client, parent_id, self.job_id, final_path, best_path, best_info, register,
            job_uid=self.job_uid, exp_id=exp_id, final_step=final_step,
        )  # fmt: skip

    def _log_round_model(self, client, path, fl_round):
        parent_id, exp_id = self._run_id(PARENT), self.queue.runs.experiment_id
        if self.models.log_model(client, parent_id, exp_id, path, "round", fl_round):
            Path(path).unlink(missing_ok=True)  # in MLflow now; the copy only waited for the writer
        else:
            self.log.warning(f"MLflow: round {fl_round}'s global model is gone ({path}); not logged")

    def _log_inputs(self, client, site, contexts):
        if self.models.input_spec is None:
            self.models.saw_inputs(contexts)  # here, in the writer's order: a recovery replays it too
            self.save_state()
        client.log_inputs(self._run_id(site), datasets=[dataset_input(c, text) for c, text in contexts])

    def report(self, status, failure, lost, records, timings: dict, extra: dict | None = None) -> tuple:
        """Write the stats file (server.stats_report); returns (nothing lost nor refused, the line to log)."""
        return write_report(self.queue, self.run_dir / STATS_FILE, status, failure, lost, records, timings, extra)
