"""flctl screenshots: what it finds in a real MLflow store, and its one-line refusals (no browser is started)."""

import pytest
from mlflow.tracking import MlflowClient

from flctl import screenshots
from flctl.errors import CliError


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(uri)


def test_it_finds_the_newest_federation_run_its_site_and_its_model(store):
    uri, client = store
    exp = client.create_experiment("job")
    # explicit start times: two runs made in the same millisecond would tie, broken by run id
    old = client.create_run(exp, start_time=1_000, run_name="old", tags={"role": "federation"}).info.run_id
    parent = client.create_run(exp, start_time=2_000, run_name="job", tags={"role": "federation"}).info.run_id
    site = client.create_run(exp, run_name="site-1", tags={"mlflow.parentRunId": parent}).info.run_id
    client.create_run(exp, run_name="site-9", tags={"mlflow.parentRunId": old})
    client.create_registered_model("job-global")
    client.create_model_version("job-global", "runs:/x/model", run_id=parent)
    t = screenshots.targets(uri, None)
    assert (t["parent"], t["site"], t["model"], t["experiment_id"]) == (parent, site, "job-global", exp)


def test_a_store_without_a_federation_run_is_named(store):
    uri, client = store
    client.create_run(client.create_experiment("other"))
    with pytest.raises(CliError, match="no federation run .*experiment 'other'"):
        screenshots.targets(uri, "other")


def test_a_chromium_path_that_does_not_exist_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "nope"))
    with pytest.raises(CliError, match="CHROMIUM=.*nope: no such file"):
        screenshots.browser()
