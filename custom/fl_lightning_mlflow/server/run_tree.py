"""The run tree in MLflow: the job's experiment, its parent run and one nested run per site.

These are actions of the write queue (run on its writer thread, retried whole on a transient
failure), so each is idempotent: a request MLflow committed may still fail on the way back (a
lost reply). Runs are looked up by their tags before they are created (JOB_UID_TAG, a uuid made
when the sink starts: the simulator's job id is always "simulate_job", so a job id would match an
earlier run). The ids go to the queue's run registry, and into the journal's state through the
sink's save_state.
"""

from fl_lightning_mlflow.common.protocol import PARENT_RUN_KEY as PARENT
from fl_lightning_mlflow.server.model_logger import JOB_UID_TAG, quoted
from fl_lightning_mlflow.server.run_registry import RunRegistry
from fl_lightning_mlflow.server.write_errors import refusal


class RunTree:
    def __init__(self, sink, runs: RunRegistry):
        """sink: the MLflowSink whose job this is (its names, tags and sites; its save_state)."""
        self.sink, self.runs = sink, runs

    def find_run(self, client, exp_id, tags: dict):
        """The active run of this job start carrying all `tags`, made by an earlier attempt whose
        reply was lost, or None."""
        query = " AND ".join(f"tags.{k} = {quoted(v)}" for k, v in {JOB_UID_TAG: self.sink.job_uid, **tags}.items())
        try:
            found = client.search_runs([exp_id], filter_string=query, max_results=2)
        except Exception as e:
            if refusal(e) is None:
                raise  # network trouble: the whole action is retried
            # A store that cannot search this way: creating is still right on a first attempt.
            self.sink.log.warning(f"MLflow: could not look up runs by tag ({type(e).__name__}: {e})")
            return None
        return found[0].info.run_id if found else None

    def setup(self, client, job_name, artifacts, tags):
        try:
            exp = client.get_experiment_by_name(self.sink.experiment_name)
            if exp:
                exp_id = exp.experiment_id
                if (
                    self.sink.requested_artifacts
                    and artifacts
                    and exp.artifact_location.rstrip("/") != artifacts.rstrip("/")
                ):
                    self.sink.log.warning(
                        f"MLflow: experiment {self.sink.experiment_name!r} exists with artifact location "
                        f"{exp.artifact_location}; artifact_location {artifacts} applies to a new experiment only"
                    )
            else:
                try:
                    exp_id = client.create_experiment(
                        self.sink.experiment_name, artifacts, tags=self.sink.experiment_tags
                    )
                except Exception as e:  # created by an attempt whose reply was lost, or by another job
                    exp = client.get_experiment_by_name(self.sink.experiment_name)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
                    self.sink.log.info(
                        f"MLflow: experiment {self.sink.experiment_name!r} exists after all ({type(e).__name__})"
                    )
            if self.sink.description:
                client.set_experiment_tag(exp_id, "mlflow.note.content", self.sink.description)
            self.runs.experiment_id = exp_id
            if PARENT not in self.runs.ids:
                tags = {**tags, JOB_UID_TAG: self.sink.job_uid, "role": "federation"}
                parent_id = self.find_run(client, exp_id, {"role": "federation"})
                if parent_id is None:
                    parent_id = client.create_run(exp_id, run_name=job_name, tags=tags).info.run_id
                self.runs.ids[PARENT] = parent_id
                self.sink.save_state()
        except Exception as e:
            self.refused(e, [PARENT, *self.sink.sites])
            raise
        for site in self.sink.sites:
            self.child(client, site)

    def child(self, client, site):
        if site in self.runs.ids:
            return
        try:
            parent_id = self.runs.run_id(PARENT)
            tags = {"site": site, "role": "site"}
            run_id = self.find_run(client, self.runs.experiment_id, tags)
            if run_id is None:
                tags = {**self.sink.run_tags, "mlflow.parentRunId": parent_id, JOB_UID_TAG: self.sink.job_uid, **tags}
                tags["job_id"] = self.sink.job_id  # on every run, as FLARE's receiver tags them
                run_id = client.create_run(self.runs.experiment_id, run_name=site, tags=tags).info.run_id
            self.runs.ids[site] = run_id
            self.sink.save_state()
        except Exception as e:
            self.refused(e, [site])
            raise

    def refused(self, error, run_keys) -> None:
        """MLflow refused for good to make these runs (e.g. the experiment is deleted): none of
        their items can be written; they go to the dead letter instead of waiting until job end."""
        reason = refusal(error)
        if reason not in (None, "?"):
            for key in run_keys:
                if key not in self.runs.ids:
                    self.runs.mark_dead(key, f"run not created: {reason}")
