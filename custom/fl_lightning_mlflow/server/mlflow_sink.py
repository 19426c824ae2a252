"""The MLflow side of the server: the run tree, the models and the stats file.

One parent run per FL job (role=federation) and one nested child run per site (role=site,
mlflow.parentRunId). Nothing here blocks its caller: every write is an item of the WriteQueue,
whose writer thread runs the "call" actions below (creating runs, logging models, the
cross-site table) and retries them like any point until the job ends.

The actions are idempotent, because a request MLflow commits may still fail on the way back
(a lost reply) and is then retried: runs are looked up by their tags before they are created
(tag JOB_UID_TAG, a uuid made when the sink starts: the simulator's job id is always
"simulate_job", so a job id would match an earlier run), and a registered model version is
looked up by its tags before one is registered (tags given at registration, not after).
"""

import collections
import json
import logging
import os
import threading
import uuid
from pathlib import Path

from fl_lightning_mlflow.common.protocol import MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH, PARENT_RUN_KEY, STATS_FILE
from fl_lightning_mlflow.server.continuation import REOPEN, reopen_run
from fl_lightning_mlflow.server.dataset_inputs import dataset_input
from fl_lightning_mlflow.server.journal import JOURNAL_DIR, save_state
from fl_lightning_mlflow.server.model_logger import JOB_UID_TAG, ModelLogger, quoted, versions
from fl_lightning_mlflow.server.tracking_uri import redact_uri
from fl_lightning_mlflow.server.write_errors import Refused, RunNotReady, refusal
from fl_lightning_mlflow.server.write_queue import DEAD_LETTER_FILE, WriteQueue

PARENT = PARENT_RUN_KEY  # the run key of the job's parent run; sites' run keys are their names

CROSS_SITE_TABLE = "cross_site_validation.json"


class MLflowSink:
    def __init__(
        self,
        tracking_uri,
        run_dir,
        experiment_name,
        models: ModelLogger,
        experiment_tags=None,
        run_tags=None,
        description="",
        promote_params=(),
        logger=None,
        resume: dict | None = None,
        requested_artifacts: bool = False,
        **queue_args,
    ):
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
        # The job's own tracking URI stays in its state, whatever URI a recovery was told to use.
        self.state_uri = redact_uri((resume or {}).get("tracking_uri") or tracking_uri)
        if resume:
            self.job_uid, self.job_id = resume["job_uid"], resume.get("job_id", "")
            self.sites, self.last_round = list(resume.get("sites") or []), resume.get("last_round")
        actions = {
            "setup": self._setup_runs,
            "child": self._create_child,
            "log_models": self._log_models,
            "log_round_model": self._log_round_model,
            "log_inputs": self._log_inputs,
            "log_table": self._log_table,
            "log_text": lambda client, key, text, path: client.log_text(self._run_id(key), text, path),
            "terminate": lambda client, key, status: client.set_terminated(self._run_id(key), status),
            REOPEN: lambda client, key: reopen_run(client, self._run_id(key)),  # a resumed job's runs
        }
        self.queue = WriteQueue(
            tracking_uri,
            self.journal_dir,
            actions,
            logger=logger,
            dead_letter_file=self.run_dir / DEAD_LETTER_FILE,
            resume=bool(resume),
            run_ids=(resume or {}).get("run_ids"),
            experiment_id=(resume or {}).get("experiment_id"),
            **queue_args,
        )
        self.save_state()

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
            "experiment_id": self.queue.experiment_id,
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
        if run_key in self.queue.dead_runs:
            raise Refused(self.queue.dead_runs[run_key])
        if run_key not in self.queue.run_ids:
            raise RunNotReady(f"no MLflow run for {run_key!r} yet")
        return self.queue.run_ids[run_key]

    def _find_run(self, client, exp_id, tags: dict):
        """The active run of this job start carrying all `tags`, made by an earlier attempt whose
        reply was lost, or None."""
        query = " AND ".join(f"tags.{k} = {quoted(v)}" for k, v in {JOB_UID_TAG: self.job_uid, **tags}.items())
        try:
            found = client.search_runs([exp_id], filter_string=query, max_results=2)
        except Exception as e:
            if refusal(e) is None:
                raise  # network trouble: the whole action is retried
            # A store that cannot search this way: creating is still right on a first attempt.
            self.log.warning(f"MLflow: could not look up runs by tag ({type(e).__name__}: {e})")
            return None
        return found[0].info.run_id if found else None

    def _setup_runs(self, client, job_name, artifacts, tags):
        try:
            exp = client.get_experiment_by_name(self.experiment_name)
            if exp:
                exp_id = exp.experiment_id
                if (
                    self.requested_artifacts
                    and artifacts
                    and exp.artifact_location.rstrip("/") != artifacts.rstrip("/")
                ):
                    self.log.warning(
                        f"MLflow: experiment {self.experiment_name!r} exists with artifact location "
                        f"{exp.artifact_location}; artifact_location {artifacts} applies to a new experiment only"
                    )
            else:
                try:
                    exp_id = client.create_experiment(self.experiment_name, artifacts, tags=self.experiment_tags)
                except Exception as e:  # created by an attempt whose reply was lost, or by another job
                    exp = client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
                    self.log.info(f"MLflow: experiment {self.experiment_name!r} exists after all ({type(e).__name__})")
            if self.description:
                client.set_experiment_tag(exp_id, "mlflow.note.content", self.description)
            self.queue.experiment_id = exp_id
            if PARENT not in self.queue.run_ids:
                tags = {**tags, JOB_UID_TAG: self.job_uid, "role": "federation"}
                parent_id = self._find_run(client, exp_id, {"role": "federation"})
                if parent_id is None:
                    parent_id = client.create_run(exp_id, run_name=job_name, tags=tags).info.run_id
                self.queue.run_ids[PARENT] = parent_id
                self.save_state()
        except Exception as e:
            self._refused_runs(e, [PARENT, *self.sites])
            raise
        for site in self.sites:
            self._create_child(client, site)

    def _create_child(self, client, site):
        if site in self.queue.run_ids:
            return
        try:
            parent_id = self._run_id(PARENT)
            tags = {"site": site, "role": "site"}
            run_id = self._find_run(client, self.queue.experiment_id, tags)
            if run_id is None:
                tags = {**self.run_tags, "mlflow.parentRunId": parent_id, JOB_UID_TAG: self.job_uid, **tags}
                tags["job_id"] = self.job_id  # on every run, as FLARE's receiver tags them
                run_id = client.create_run(self.queue.experiment_id, run_name=site, tags=tags).info.run_id
            self.queue.run_ids[site] = run_id
            self.save_state()
        except Exception as e:
            self._refused_runs(e, [site])
            raise

    def _refused_runs(self, error, run_keys) -> None:
        """MLflow refused for good to make these runs (e.g. the experiment is deleted): none of
        their items can be written; they go to the dead letter instead of waiting until job end."""
        reason = refusal(error)
        if reason not in (None, "?"):
            for key in run_keys:
                if key not in self.queue.run_ids:
                    self.queue.mark_dead(key, f"run not created: {reason}")

    def _log_table(self, client, run_key, rows, artifact_file):
        columns = {name: [r[name] for r in rows] for name in ("model", "data_site", "metric", "value")}
        client.log_table(self._run_id(run_key), columns, artifact_file)

    def _log_models(self, client, final_path, best_path, best_info, register, final_step=None):
        parent_id, exp_id = self._run_id(PARENT), self.queue.experiment_id
        self.models.log(
            client, self.queue.tracking_uri, parent_id, self.job_id, final_path, best_path, best_info, register,
            job_uid=self.job_uid, exp_id=exp_id, final_step=final_step,
        )  # fmt: skip

    def _log_round_model(self, client, path, fl_round):
        parent_id, exp_id = self._run_id(PARENT), self.queue.experiment_id
        if self.models.log_model(client, self.queue.tracking_uri, parent_id, exp_id, path, "round", fl_round):
            Path(path).unlink(missing_ok=True)  # in MLflow now; the copy only waited for the writer
        else:
            self.log.warning(f"MLflow: round {fl_round}'s global model is gone ({path}); not logged")

    def _log_inputs(self, client, site, contexts):
        if self.models.input_spec is None:
            self.models.saw_inputs(contexts)  # here, in the writer's order: a recovery replays it too
            self.save_state()
        client.log_inputs(self._run_id(site), datasets=[dataset_input(c, text) for c, text in contexts])

    # ----- the account ---------------------------------------------------------------------------
    def report(self, status, failure, lost, records, timings: dict, extra: dict | None = None) -> tuple:
        """Write the stats file, with extra's keys beside the sink's own; returns (nothing lost
        nor refused, the one line to log). Never raises: whatever part of the account cannot be
        made, the file is written."""
        queue, path = self.queue, self.run_dir / STATS_FILE
        refused = {key: n for key, n in queue.refused_by_run.items() if n}
        stats = {"status": status, "failure": failure, "lost": dict(lost)}
        try:
            stats.update(
                {
                    "received": {site: dict(c) for site, c in records.received.items()},
                    "written": {k: v for k, v in queue.stats.items() if k.startswith("written_")},
                    "lost": dict(lost),
                    "refused": refused,  # run key -> points MLflow refused for good (in the dead letter)
                    "refused_actions": queue.stats["refused_call"],
                    "dead_letter": str(queue.dead_letter_file) if queue.dead_letter_file.exists() else None,
                    "quarantined": queue.stats["quarantined"],  # unreadable journal lines, kept aside
                    "rejected": dict(records.rejected),
                    # site -> system/ points received: monitoring, outside the delivery table
                    "system_metrics": dict(getattr(records, "system_received", {})),
                    "truncated": dict(records.truncated),
                    "write_failures": queue.stats["failures"],
                    "spilled": queue.stats["spilled"],
                    "journal": str(queue.journal.folder),
                    "journal_failures": queue.stats["journal_failures"],
                    "max_event_seconds": round(timings["max_event_seconds"], 6),
                    "probe_seconds": round(timings["probe_seconds"], 6),
                    "slowest_event": timings["slowest_event"],
                    "run_ids": dict(queue.run_ids),
                }
            )
        except Exception as e:  # noqa: BLE001 - a partial account is better than none
            stats["account_error"] = f"{type(e).__name__}: {e}"
            stats.setdefault("run_ids", dict(queue.run_ids))
        stats.update(extra or {})
        try:
            path.write_text(json.dumps(stats, indent=2, default=str))
        except (OSError, TypeError, ValueError) as e:
            self.log.error(f"MLflow: could not write {path}: {e}")
        if queue.client is not None:
            marks = [(key, "refused_items", str(n)) for key, n in refused.items() if key not in queue.dead_runs]
            if sum(lost.values()):
                marks.append((PARENT, "lost_items", json.dumps(dict(lost))))
            for key, tag, value in marks:  # one quick attempt each to mark it on the run itself
                try:
                    if key in queue.run_ids:
                        queue.client.set_tag(queue.run_ids[key], tag, value)
                except Exception:  # noqa: BLE001, S110 - the server is still unreachable; the log and file say it
                    pass
        where = f"counts in {path}"
        if refused:
            where += f"; refused items with MLflow's reasons in {queue.dead_letter_file}"
        if not sum(lost.values()):
            if refused:
                return (
                    False,
                    f"MLflow: refused {sum(refused.values())} item(s) for good {refused}; status {status}; {where}",
                )
            slowest = timings["max_event_seconds"] * 1000
            return (
                True,
                f"MLflow: all written ({stats.get('written')}); status {status}; "
                f"slowest event handled in {slowest:.1f} ms",
            )
        error = redact_uri(str(queue.last_error))
        return (
            False,
            f"MLflow: could not write {dict(lost)} after retrying until job end (last error: {error}); {where}",
        )
