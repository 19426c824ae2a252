"""Global models as MLflow LoggedModels (step = round, the round's metrics linked), the best and
the final registered under the aliases champion and final, against a real SQLite store."""

import json
import time

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils
from torch.utils.data import DataLoader, TensorDataset

from cifar10_example.lit_module import LitCifarNet
from cifar10_example.network import CifarNet
from fl_lightning_mlflow.server.initial_model import initial_model
from fl_lightning_mlflow.server.model_logger import CHAMPION_ALIAS, FINAL_ALIAS, JOB_UID_TAG, MODEL_NAME, ModelLogger
from fl_lightning_mlflow.server.records import RecordChecker
from fl_lightning_mlflow.site.dataset_info import site_datasets

NAME = "test-global"


@pytest.fixture
def parent(tmp_path, monkeypatch):
    """A parent run with two rounds of global metrics, and the global weights of rounds 1 and 2."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("job", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("global_val_acc", 0.3 + r / 10, now, r) for r in range(2)])
    paths = {}
    for r in (1, 2):
        torch.manual_seed(r)
        paths[r] = tmp_path / f"round_{r}.pt"
        torch.save(CifarNet().state_dict(), paths[r])
    previous = tracking_utils._tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored after the test
    mlflow.set_tracking_uri(uri)  # the test's own reads of models:/ URIs go through MLflow's global URI
    yield uri, client, experiment, run_id, paths
    mlflow.set_tracking_uri(previous)


def test_round_models_the_champion_and_the_final_model(parent, tmp_path):
    uri, client, experiment, run_id, paths = parent
    logger = ModelLogger("cifar10_example.network.CifarNet", NAME)
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    mlflow.set_tracking_uri(elsewhere)  # not the job's store: ModelLogger must neither use nor move it
    round_1 = logger.log_model(client, run_id, experiment, paths[1], "round", 1)
    again = ModelLogger(logger.model_spec, NAME)  # a retried action after a lost reply: found, not logged
    assert again.log_model(client, run_id, experiment, paths[1], "round", 1) == round_1
    assert logger.log_model(client, run_id, experiment, "/nonexistent.pt", "round", 0) is None
    # At job end: the best round is round 1 (logged already), the final model comes after 2 rounds.
    logger.log(client, run_id, "job-1", paths[2], paths[1], (1, 0.4), True, job_uid="uid-1", exp_id=experiment,
               final_step=2)  # fmt: skip
    assert tracking_utils._tracking_uri == elsewhere and not (tmp_path / "elsewhere.db").exists()
    mlflow.set_tracking_uri(uri)  # the test's own reads from here

    models = {m.tags["fl_model"]: m for m in client.search_logged_models(experiment_ids=[experiment])}
    assert sorted(models) == ["final", "round"] and {m.name for m in models.values()} == {MODEL_NAME}
    assert models["round"].model_id == round_1 and models["round"].source_run_id == run_id
    # MLflow linked the parent run's metrics at the model's step to it: the round's global metrics.
    assert [(m.key, m.step, m.value) for m in models["round"].metrics] == [("global_val_acc", 1, 0.4)]
    assert not models["final"].metrics  # no round measured the final model
    outputs = {o.model_id: o.step for o in client.get_run(run_id).outputs.model_outputs}
    assert outputs == {round_1: 1, models["final"].model_id: 2}
    assert client.get_run(run_id).info.status == "RUNNING"  # logging a model does not end the run

    champion = client.get_model_version_by_alias(NAME, CHAMPION_ALIAS)
    final = client.get_model_version_by_alias(NAME, FINAL_ALIAS)
    assert champion.source == f"models:/{round_1}" and champion.tags["round"] == "1"
    assert champion.tags[JOB_UID_TAG] == "uid-1"
    assert final.source == f"models:/{models['final'].model_id}" and final.tags["round"] == "2"
    assert logger.registered()["uris"] == {"champion": f"models:/{NAME}@champion", "final": f"models:/{NAME}@final"}
    net = mlflow.pytorch.load_model(f"models:/{NAME}@champion")
    saved = torch.load(paths[1], weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())  # the best round's weights
    with torch.no_grad():
        assert net(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    # No site described its inputs (input_spec None): no input example, so no signature either.
    info = mlflow.models.get_model_info(f"models:/{round_1}")
    assert logger.input_spec is None and info.saved_input_example_info is None and info.signature is None

    # The next job's best takes the alias; this job's version stays.
    logger.log(client, run_id, "job-1", paths[2], paths[1], (1, 0.4), True, job_uid="uid-1", exp_id=experiment,
               final_step=2)  # fmt: skip
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2  # retried whole: registered once each
    other = ModelLogger(logger.model_spec, NAME)
    other.register(client, round_1, run_id, {"job_id": "job-2", JOB_UID_TAG: "uid-2", "model": "best_global_model"},
                   CHAMPION_ALIAS)  # fmt: skip
    assert str(client.get_model_version_by_alias(NAME, CHAMPION_ALIAS).version) == "3"


class Images(pl.LightningDataModule):
    """A site's DataModule (CIFAR-shaped images), for the dataset description the site sends."""

    def __init__(self, n: int):
        super().__init__()
        self.data_root = "/data/cifar10"
        self.images = TensorDataset(torch.rand(n, 3, 32, 32), torch.arange(n) % 10)

    def train_dataloader(self):
        return DataLoader(self.images, batch_size=4)

    def val_dataloader(self):
        return DataLoader(self.images, batch_size=4)


def test_the_persistors_lightning_module_is_copied_with_an_input_example_of_the_sites_shape(parent, tmp_path):
    uri, client, experiment, run_id, _ = parent
    module_spec = {"path": "cifar10_example.lit_module.LitCifarNet", "config_type": "dict", "args": {"lr": 0.05}}
    model = initial_model(module_spec, seed=0)  # the persistor's model, as config_fed_server.json builds it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    weights = tmp_path / "round_1_lit.pt"
    torch.save({"model": LitCifarNet().state_dict()}, weights)  # the round's global weights, as the persistor saves
    logger = ModelLogger(None, NAME)  # the tracker's: the model comes from the persistor
    logger.use_model(model)
    assert logger.model_spec == {"path": module_spec["path"], "args": {"lr": 0.05}}  # for a later recovery

    # The sites' dataset descriptions, through the server's checks, as the sink hands them over.
    checker = RecordChecker(warn=lambda line: None)
    logger.saw_inputs(checker.datasets("site-1", {"validation": site_datasets("site-1", Images(4))["validation"]}))
    assert logger.input_spec is None  # the input spec is the training set's
    logger.saw_inputs(checker.datasets("site-1", site_datasets("site-1", Images(8))))
    assert logger.input_spec == ((3, 32, 32), "float32")
    logger.saw_inputs([("training", json.dumps({**json.loads(site_datasets("site-2", Images(4))["training"]),
                                                "input_shape": [1, 28, 28]}))])  # fmt: skip
    assert logger.input_spec == ((3, 32, 32), "float32")  # the first site's: all sites train one model

    model_id = logger.log_model(client, run_id, experiment, weights, "round", 1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a copy got the weights
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    assert info.saved_input_example_info["type"] == "ndarray"
    assert [(s.type, s.shape) for s in info.signature.inputs.inputs] == [(np.dtype("float32"), (-1, 3, 32, 32))]
    assert [s.shape for s in info.signature.outputs.inputs] == [(-1, 10)]
    example = mlflow.models.Model.load(f"models:/{model_id}").load_input_example(
        mlflow.artifacts.download_artifacts(f"models:/{model_id}")
    )
    assert example.shape == (1, 3, 32, 32) and example.dtype == np.float32

    # The logged model is the LightningModule itself, the round's weights in it; it loads and predicts.
    loaded = mlflow.pytorch.load_model(f"models:/{model_id}")
    assert type(loaded) is LitCifarNet and loaded.hparams.lr == 0.05
    saved = torch.load(weights, weights_only=True)["model"]
    assert set(loaded.state_dict()) == set(saved)
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = LitCifarNet().eval()
        expected.load_state_dict(saved)
        torch.testing.assert_close(loaded.eval()(x), expected(x))
    predicted = mlflow.pyfunc.load_model(f"models:/{model_id}").predict(x.numpy())  # the signature lets it in
    assert predicted.shape == (5, 10)


IMPORT_CHECK = """
import sys
{before}
from fl_lightning_mlflow.server.model_logger import import_mlflow_pytorch
module = import_mlflow_pytorch()
print(callable(module.log_model), "pytorch_lightning" in sys.modules,
      hasattr(module, "MlflowModelCheckpointCallback"), sys.modules.get("pytorch_lightning", 0) is None)
import pytorch_lightning  # still importable afterwards
print(pytorch_lightning.Trainer.__name__)
"""


@pytest.mark.parametrize(
    "before, expected",
    [
        # the FL server: Lightning stays out of the process (about 5 s of imports saved at job end)
        ("", "True False False False\nTrainer"),
        # a process that trains with Lightning keeps mlflow.pytorch's Lightning hook as it is
        ("import pytorch_lightning", "True True True False\nTrainer"),
    ],
)
def test_mlflow_pytorch_is_imported_without_lightning_unless_lightning_is_there(before, expected):
    import subprocess
    import sys

    code = IMPORT_CHECK.format(before=before)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == expected


def test_an_installed_librarys_model_class_is_a_requirement_not_shipped_code():
    """code_paths ships the user's own package; a class from site-packages (torch's, torchvision's)
    would copy the whole library into every logged model: it becomes a pinned requirement instead."""
    import torchvision

    from cifar10_example.lit_module import LitCifarNet
    from fl_lightning_mlflow.server.model_logger import code_path, requirements

    assert code_path(torch.nn.Linear) is None and code_path(torchvision.models.ResNet) is None
    assert code_path(LitCifarNet).endswith("cifar10_example")
    assert requirements(torchvision.models.resnet18())[1].startswith("torchvision==")
    assert [r.split("==")[0] for r in requirements(LitCifarNet())] == ["torch", "pytorch-lightning"]
    assert [r.split("==")[0] for r in requirements(torch.nn.Linear(2, 1))] == ["torch"]
