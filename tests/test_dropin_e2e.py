"""Drop-in where users come from: FLARE's MLflowWriter calls and MLflowReceiver arguments, through
FLARE's real ConvertToFedEvent and simulator into a real MLflow store (the plain-PyTorch job,
whose sites log through MLflowWriter, plus tests/site_code/flare_user_site.py)."""

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO
from fl_lightning_mlflow.common.protocol import STATS_FILE
from flctl.simulate import simulate

pytestmark = pytest.mark.slow

ARTIFACTS = "receiver_artifacts"  # FLARE's receiver argument: relative to the job's run folder


@pytest.fixture(scope="module")
def dropin_run(offline_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dropin")
    job = tmp / "hello-pt-mlflow"
    shutil.copytree(REPO / "jobs" / "hello-pt-mlflow", job, symlinks=False)
    shutil.copy(REPO / "tests/site_code/flare_user_site.py", job / "app/custom")
    client, server = job / "app/config/config_fed_client.json", job / "app/config/config_fed_server.json"
    config = json.loads(client.read_text())
    config["components"].append({"id": "flare_user_site", "path": "flare_user_site.FlareUserSite", "args": {}})
    client.write_text(json.dumps(config, indent=2))
    config = json.loads(server.read_text())
    tracker = next(c for c in config["components"] if c["id"] == "mlflow_tracker")
    # What a config from FLARE's own templates and tracking docs passes to MLflowReceiver.
    tracker["args"].update(artifact_location=ARTIFACTS, buffer_flush_time=1)
    server.write_text(json.dumps(config, indent=2))
    run = simulate(job, tmp / "ws", offline_data, sites=2, rounds=1, prepare=False, evaluate=False,
                   say=lambda m: None, show=None, timeout=600)  # fmt: skip
    return run


def test_a_server_config_with_flare_receiver_arguments_builds_and_tracks(dropin_run):
    assert dropin_run.outcome.stats["status"] == "FINISHED"
    assert "buffer_flush_time=1 (MLflowReceiver's flush interval) has nothing to set here" in dropin_run.log
    client = MlflowClient(f"sqlite:///{dropin_run.server_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hello-pt-mlflow")
    assert experiment.artifact_location == (dropin_run.server_dir / ARTIFACTS).resolve().as_uri()


def site_runs(run):
    client = MlflowClient(f"sqlite:///{run.server_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hello-pt-mlflow")
    runs = client.search_runs([experiment.experiment_id])
    return client, {r.data.tags["site"]: r for r in runs if r.data.tags.get("role") == "site"}


def test_a_user_param_or_tag_named_datasets_is_stored_like_any_other(dropin_run):
    from site_code.flare_user_site import NO_STEP_METRIC

    client, sites = site_runs(dropin_run)
    assert sorted(sites) == ["site-1", "site-2"]
    experiment = client.get_experiment_by_name("hello-pt-mlflow")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.role = 'federation'")
    for run in sites.values():
        assert run.data.tags["datasets"] == "cifar10" and run.data.params["datasets"] == "cifar10-v2"
        # ... and the project's own dataset description still becomes the run's dataset inputs
        contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
        assert contexts == ["training", "validation"]
        # log_metric without a step: the steps count up per name (FLARE's docs say step 0); the two
        # calls are two FLARE events, which may arrive in either order
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, NO_STEP_METRIC))
        assert [s for s, _ in points] == [0, 1] and sorted(v for _, v in points) == [1.0, 2.0]
        assert run.data.tags["job_id"] == parent.data.tags["job_id"]  # on every run, as FLARE's receiver
    stats = json.loads((dropin_run.server_dir / STATS_FILE).read_text())
    assert not [line for line in stats.get("rejected", {}) if "datasets" in line]


def test_a_refused_name_sent_through_flares_writer_is_counted_on_the_server(dropin_run):
    from site_code.flare_user_site import REFUSED_METRIC

    client, sites = site_runs(dropin_run)
    for run in sites.values():
        assert "user_ok" in run.data.metrics and REFUSED_METRIC not in run.data.metrics
    stats = json.loads((dropin_run.server_dir / STATS_FILE).read_text())
    refused = [line for line in stats.get("rejected", {}) if repr(REFUSED_METRIC) in line]
    assert refused, stats.get("rejected")
    assert f"rejected site-1: metric name {REFUSED_METRIC!r} has characters MLflow does not accept" in dropin_run.log
