"""A global model into an MLflow LoggedModel through one MlflowClient, no global MLflow state.

mlflow.pytorch.log_model (the fluent flavour API) logs into the store of MLflow's process-wide
tracking URI, so the writer thread had to set that URI first. Here the flavour only saves the
model into a local folder, and the client the write queue made from its tracking URI does what
mlflow.models.Model.log (MLflow 3.17) does with it: link the model to the parent run at its step,
link the run's metrics at that step to it, upload the folder, and mark the model READY (FAILED when
any of that raises, as Model.log does). Left out of Model.log: the serving check of the input
example (it only warns), Databricks' extras and prompts, none of which the FL server uses.

One place still needs the global URI: MLflow's database model registry resolves a `models:/<id>`
version source through a client it makes itself from the global URI (its own TODO in
mlflow/store/model_registry/sqlalchemy_store.py, create_model_version). `registry_uri_of` sets it
for that one call and puts back what was there before, environment variable included.
"""

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

_global_uri_lock = threading.Lock()  # one block at a time sets and restores the process-wide URI


def upload_model(client, model_id: str, run_id: str, step: int, net, flavor, **save_args) -> None:
    """net saved with the flavour (mlflow.pytorch) as LoggedModel model_id (made already, by
    client.create_logged_model), linked to run_id at step; save_args go to flavor.save_model."""
    from mlflow.models import Model

    logged = client.get_logged_model(model_id)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step)])
        link_step_metrics(client, model_id, run_id, step)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            mlflow_model = Model(
                artifact_path=logged.artifact_location, model_uuid=model_id, run_id=run_id, model_id=model_id
            )
            flavor.save_model(net, str(local), mlflow_model=mlflow_model, **save_args)
            # Saving loads the model back to check it, which can leave __pycache__ in the shipped code.
            for pycache in local.rglob("__pycache__"):
                shutil.rmtree(pycache, ignore_errors=True)
            client.log_model_artifacts(model_id, str(local))
    except Exception:
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model_id, LoggedModelStatus.READY)


def link_step_metrics(client, model_id: str, run_id: str, step: int) -> None:
    """The run's metrics at step, logged again with the model's id: how MLflow links a model to
    the metrics that measured it (Model.log's log_model_metrics_for_step)."""
    linked = []
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            if m.step == step and m.model_id is None:
                dataset = {"dataset_name": m.dataset_name, "dataset_digest": m.dataset_digest}
                linked.append(Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id, **dataset))
    if linked:
        client.log_batch(run_id, metrics=linked)


@contextlib.contextmanager
def registry_uri_of(client):
    """MLflow's global tracking URI set to the client's for the block (database stores only; a
    tracking server resolves the source itself), then restored with its environment variable."""
    from mlflow.tracking._tracking_service import utils

    uri = client.tracking_uri
    if uri.startswith(("http://", "https://", "databricks")):
        yield
        return
    with _global_uri_lock:
        saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
        utils.set_tracking_uri(uri)
        try:
            yield
        finally:
            utils.set_tracking_uri(saved_uri)  # None unsets the environment variable
            if saved_env is not None:
                os.environ["MLFLOW_TRACKING_URI"] = saved_env
