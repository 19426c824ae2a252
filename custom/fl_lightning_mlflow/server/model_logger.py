"""The global models in MLflow: LoggedModels on the parent run, the best and final registered.

Every global model is a LoggedModel named MODEL_NAME on the parent run with step = its round, so
the parent run's metrics at that step (the round's global metrics, which measured that very
model) are linked to it; which rounds are logged is the tracker's log_models policy
(server.model_policy). At job end the best and the final models are registered: the best under
the alias `champion`, the final under `final` (MLflow reserves `latest`), so
`models:/NAME@champion` always loads the best model of the newest finished job.

Runs in the write queue's thread as one of the sink's actions, and is retried whole when it
fails on the way: a logged model is looked up by its run, kind and step before it is logged
again, and a model version by its tags before one is registered (the tags go with the
registration request, so no retry can leave an untagged version behind). Everything goes through
the writer's client (server.model_upload): no global MLflow state is set from the writer thread,
but for the one registry call MLflow itself resolves with the global URI, set and restored there.
"""

import copy
import importlib
import json
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from mlflow.exceptions import MlflowException

from fl_lightning_mlflow.common.class_spec import build
from fl_lightning_mlflow.server.dataset_inputs import input_spec_of
from fl_lightning_mlflow.server.model_upload import registry_uri_of, upload_model
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


def import_mlflow_pytorch():
    """mlflow.pytorch, imported without its optional Lightning autologging hook.

    mlflow.pytorch ends by importing its Lightning autolog callback, which imports
    pytorch_lightning, torchmetrics, torchvision's models and torch._dynamo: about 5 s of CPU at
    the end of every job on a small server, for a hook the FL server never uses (it trains
    nothing). mlflow.pytorch catches the ImportError when Lightning is missing, so Lightning is
    hidden for that one import. A process that already imported Lightning keeps it as it is."""
    if "mlflow.pytorch" not in sys.modules and "pytorch_lightning" not in sys.modules:
        sys.modules["pytorch_lightning"] = None  # `import pytorch_lightning` now raises ImportError
        try:
            importlib.import_module("mlflow.pytorch")
        finally:
            if "pytorch_lightning" in sys.modules and sys.modules["pytorch_lightning"] is None:
                del sys.modules["pytorch_lightning"]
    return importlib.import_module("mlflow.pytorch")


def installed(path: Path) -> bool:
    """Whether path is inside an installed library's folder (site-packages), not the user's code."""
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    return any(Path(path).resolve().is_relative_to(Path(root).resolve()) for root in roots)


def code_path(cls) -> str | None:
    """What code_paths ships for a model class: its whole top-level package (or its module file),
    so the pickled class imports where the model loads, without the user's code installed there;
    None for a class of an installed library (torchvision's, torch's own): a requirement instead."""
    top = sys.modules[cls.__module__.partition(".")[0]]
    path = Path(top.__file__)
    path = path.parent if path.name == "__init__.py" else path
    return None if installed(path) else str(path)


def requirements(net) -> list:
    """What loading the model needs: torch, Lightning for a LightningModule, and the installed
    library the model's class comes from (when it is not shipped as code)."""
    needed = [f"torch=={metadata.version('torch')}"]
    if any(c.__module__.startswith(("pytorch_lightning", "lightning")) for c in type(net).__mro__):
        needed.append(f"pytorch-lightning=={metadata.version('pytorch-lightning')}")
    top = type(net).__module__.partition(".")[0]
    if code_path(type(net)) is None and top != "torch":
        for dist in metadata.packages_distributions().get(top, []):
            needed.append(f"{dist}=={metadata.version(dist)}")
    return sorted(set(needed), key=needed.index)


MODEL_NAME = "global_model"  # every global model of a job is a LoggedModel of this name, its step the round
ROUND_TAG = "fl_round"  # the round whose received global model it is (the step of its linked metrics)
KIND_TAG = "fl_model"  # "round": a round's global model; "final": the model after the last round
CHAMPION_ALIAS = "champion"  # the best global model's registered version
FINAL_ALIAS = "final"  # the final global model's version ("latest" is reserved by MLflow's registry)


class ModelLogger:
    """Writer thread: global models as MLflow LoggedModels on the parent run (step = round, the
    round's metrics linked), the best and the final registered under the aliases champion and final."""

    def __init__(self, model_spec: dict | str | None, registered_model_name: str):
        """model_spec: {"path": "pkg.mod.Class", "args": {...}} (or a class path alone) the global
        model is built from, as the persistor built it (server.initial_model); use_model() gives
        the persistor's model itself, which is then copied instead."""
        self.model_spec = {"path": model_spec, "args": {}} if isinstance(model_spec, str) else model_spec
        self.template = None  # the persistor's model: copied, never changed
        self.input_spec = None  # (shape of one sample, dtype), from the first site's dataset description
        self.registered_model_name = registered_model_name
        self.logged: dict = {}  # (kind, step) -> model id: a retried call skips what an earlier attempt logged
        self.aliases: dict = {}  # alias -> registered version, for the stats file (flctl prints the URI)

    def use_model(self, model) -> None:
        """The persistor's model (any nn.Module, a LightningModule included) and where it came from."""
        from fl_lightning_mlflow.server.initial_model import spec_of

        self.template, self.model_spec = model, spec_of(model)

    def saw_inputs(self, contexts) -> None:
        """A site's checked dataset contexts [(context, JSON text)]: the training one's input shape
        and dtype become the logged models' input example (the first site's; all train one model)."""
        if self.input_spec is not None:
            return
        for context, text in contexts:
            if context == "training":
                self.input_spec = input_spec_of(json.loads(text))

    def load(self, path) -> tuple:
        """(the model with the saved weights, the code to ship as code_paths)."""
        import torch

        if self.template is not None:
            net = copy.deepcopy(self.template)
        elif self.model_spec:
            net = build(self.model_spec, "ModelLogger", "model")
        else:
            raise ValueError("ModelLogger: no model to load the global weights into (no persistor model, no spec)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = saved.get("model", saved)
        net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        return net.eval(), code_path(type(net))

    def example(self):
        """A zero input of the sites' sample shape (batch of one), or None when no site said it."""
        import numpy as np

        if self.input_spec is None:
            return None
        shape, dtype = self.input_spec
        return np.zeros((1, *shape), dtype=dtype)

    def log_model(self, client, parent_id, exp_id, path, kind: str, step: int) -> str | None:
        """The LoggedModel of this kind and step on the parent run: found if an earlier attempt
        logged it, else logged from the weights in `path` (None if there are none), through the
        client alone (server.model_upload), linked to the parent run's metrics at `step`."""
        key = (kind, int(step))
        if key in self.logged:
            return self.logged[key]
        exp_id = exp_id or client.get_run(parent_id).info.experiment_id
        model_id = self.find(client, exp_id, parent_id, kind, step)
        if model_id is None:
            if not Path(path).is_file():
                return None
            net, code = self.load(path)
            # Made here, in the job's experiment, with the tags a retry finds it by.
            tags = {KIND_TAG: kind, ROUND_TAG: str(int(step))}
            model_id = client.create_logged_model(exp_id, name=MODEL_NAME, source_run_id=parent_id, tags=tags).model_id
            upload_model(
                client, model_id, parent_id, int(step), net, import_mlflow_pytorch(),
                code_paths=[code] if code else None,
                input_example=self.example(),  # MLflow infers the signature from it
                pip_requirements=requirements(net),
                serialization_format="pickle",  # the module object: any batch size, code_paths bring the class
            )  # fmt: skip
        self.logged[key] = model_id
        return model_id

    def find(self, client, exp_id, run_id, kind, step) -> str | None:
        """The READY model of this kind and step an earlier attempt logged on this run, if any."""
        if exp_id is None:
            return None
        try:
            query = f"source_run_id = {quoted(run_id)} AND name = {quoted(MODEL_NAME)}"
            found = client.search_logged_models(experiment_ids=[exp_id], filter_string=query)
        except Exception as e:
            if refusal(e) is None:
                raise  # network trouble: the whole action is retried
            return None  # a store that cannot search this way: logging is still right on a first attempt
        for model in found:
            tags = model.tags or {}
            if str(model.status) == "READY" and tags.get(KIND_TAG) == kind and tags.get(ROUND_TAG) == str(int(step)):
                return model.model_id
        return None

    def log(
        self,
        client,
        parent_id,
        job_id,
        final_path,
        best_path,
        best_info,
        register,
        job_uid="",
        exp_id=None,
        final_step=None,
    ):
        """At job end: the best round's model (unless that round's is logged already) and the final
        one; with register, each registered and aliased. Retried whole after a failure, so each step
        first looks for what an earlier attempt (or a lost reply) did."""
        best_id = final_id = None
        if best_info:
            best_id = self.log_model(client, parent_id, exp_id, best_path, "round", best_info[0])
        if final_step is not None:
            final_id = self.log_model(client, parent_id, exp_id, final_path, "final", final_step)
        if not register:
            return
        tags = {"job_id": job_id, JOB_UID_TAG: job_uid}
        if best_id:
            best_tags = {**tags, "model": "best_global_model", "round": str(best_info[0])}
            best_tags["key_metric_value"] = str(best_info[1])
            self.register(client, best_id, parent_id, best_tags, CHAMPION_ALIAS)
        if final_id:
            final_tags = {**tags, "model": "final_global_model", "round": str(final_step)}
            self.register(client, final_id, parent_id, final_tags, FINAL_ALIAS)

    def register(self, client, model_id, run_id, tags, alias) -> None:
        """One registered version per job and model (tags set at registration, so no window between
        registering and tagging; a version carrying this job's tags is reused), then its alias."""
        name = self.registered_model_name
        query = f"name = {quoted(name)} AND tags.{JOB_UID_TAG} = {quoted(tags[JOB_UID_TAG])}"
        query += f" AND tags.model = {quoted(tags['model'])}"
        found = []
        try:
            found = client.search_model_versions(query)
        except Exception as e:
            if refusal(e) is None:
                raise  # network trouble: the whole action is retried
            # A registry that cannot search by tags: registering is still right on a first attempt.
        if found:
            version = found[0].version
        else:
            try:
                client.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            with registry_uri_of(client):  # MLflow's database registry resolves models:/ with the global URI
                version = client.create_model_version(
                    name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
                ).version
        client.set_registered_model_alias(name, alias, version)  # moves the alias from an earlier job's version
        self.aliases[alias] = str(version)

    def registered(self) -> dict:
        """For the stats file: {"name", "aliases": {alias: version}, "uris": {alias: models:/NAME@alias}}."""
        name = self.registered_model_name
        uris = {alias: f"models:/{name}@{alias}" for alias in self.aliases}
        return {"name": name, "aliases": dict(self.aliases), "uris": uris}
