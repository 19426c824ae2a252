"""The global models in MLflow: the final and best as PyTorch models, the best registered.

Runs in the write queue's thread as one of the sink's actions, and is retried whole when it
fails on the way: a logged model is looked up by its run and name before it is logged again,
and a model version by its tags before one is registered (the tags go with the registration
request, so no retry can leave an untagged version behind).
"""

import importlib
import sys
from importlib import metadata
from pathlib import Path

from mlflow.exceptions import MlflowException

from fl_lightning_mlflow.server.write_errors import refusal

JOB_UID_TAG = "fl_job_uid"  # unique per job start, on every run and registered version of the job


def quoted(value) -> str:
    """A value for an MLflow filter string (single-quoted; a quote inside is escaped)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def versions() -> dict:
    out = {}
    for dist in ("nvflare", "pytorch-lightning", "mlflow", "torch"):
        try:
            out[f"{dist}_version"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class ModelLogger:
    """Writer thread: the final and best global models as MLflow PyTorch models, the best registered."""

    def __init__(self, model_class_path: str, registered_model_name: str):
        self.model_class_path = model_class_path
        self.registered_model_name = registered_model_name
        self.logged: set = set()  # a retried call skips what an earlier attempt logged

    def load(self, path) -> tuple:
        """(the network with the saved weights, the directory to ship as code_paths)."""
        import torch

        module, _, name = self.model_class_path.rpartition(".")
        net = getattr(importlib.import_module(module), name)()
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = saved.get("model", saved)
        net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        # code_paths takes the whole top-level package, so the pickled class imports where the model loads
        return net.eval(), str(Path(sys.modules[module.partition(".")[0]].__file__).parent)

    def log(
        self,
        client,
        tracking_uri,
        parent_id,
        job_id,
        final_path,
        best_path,
        best_info,
        register,
        job_uid="",
        exp_id=None,
    ):
        """Log both models on the parent run and register the best. Retried whole after a
        failure, so each step first looks for what an earlier attempt (or a lost reply) did."""
        import mlflow
        import mlflow.pytorch
        import numpy as np

        mlflow.set_tracking_uri(tracking_uri)
        example = np.zeros((1, 3, 32, 32), dtype=np.float32)
        with mlflow.start_run(run_id=parent_id):
            for name, path in (("final_global_model", final_path), ("best_global_model", best_path)):
                if name in self.logged or not Path(path).is_file():
                    continue
                model_uri = self.logged_model_uri(client, exp_id, parent_id, name)
                if model_uri is None:
                    net, code = self.load(path)
                    model_uri = mlflow.pytorch.log_model(
                        net,
                        name=name,
                        code_paths=[code],
                        input_example=example,
                        pip_requirements=[f"torch=={metadata.version('torch')}"],
                        serialization_format="pickle",  # a plain nn.Module: any batch size, code_paths bring the class
                    ).model_uri
                if name == "best_global_model" and register:
                    tags = {"job_id": job_id, JOB_UID_TAG: job_uid, "model": name}
                    if best_info:
                        tags.update(round=str(best_info[0]), key_metric_value=str(best_info[1]))
                    self.register(client, model_uri, parent_id, tags)
                self.logged.add(name)

    @staticmethod
    def logged_model_uri(client, exp_id, run_id, name) -> str | None:
        """The model an earlier attempt logged on this run under this name, if it completed."""
        if exp_id is None:
            return None
        try:
            found = client.search_logged_models(
                experiment_ids=[exp_id], filter_string=f"source_run_id = {quoted(run_id)} AND name = {quoted(name)}"
            )
        except Exception as e:
            if refusal(e) is None:
                raise  # network trouble: the whole action is retried
            return None  # a store that cannot search this way: logging is still right on a first attempt
        ready = [m for m in found if str(m.status) == "READY"]
        return f"models:/{ready[0].model_id}" if ready else None

    def register(self, client, model_uri, run_id, tags):
        """One registered version per job: tags are set at registration (no window between
        registering and tagging), and a version carrying this job's tags is reused."""

        name = self.registered_model_name
        query = f"name = {quoted(name)} AND tags.{JOB_UID_TAG} = {quoted(tags[JOB_UID_TAG])}"
        query += f" AND tags.model = {quoted(tags['model'])}"
        try:
            if client.search_model_versions(query):
                return
        except Exception as e:
            if refusal(e) is None:
                raise  # network trouble: the whole action is retried
            # A registry that cannot search by tags: registering is still right on a first attempt.
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
        client.create_model_version(name, model_uri, run_id=run_id, tags=tags, model_id=model_id)
