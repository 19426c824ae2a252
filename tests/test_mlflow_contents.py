"""flctl contents: what an MLflow store holds, for before/after comparisons."""

import pytest
from mlflow.tracking import MlflowClient

from flctl.errors import CliError
from flctl.mlflow_contents import contents


def test_runs_params_and_series_point_counts_of_a_run_tree(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("tree")
    parent = client.create_run(experiment, tags={"role": "federation"}).info.run_id
    site = client.create_run(experiment, tags={"role": "site", "site": "site-1", "mlflow.parentRunId": parent})
    for step in range(3):
        client.log_metric(site.info.run_id, "train_loss", 1.0 / (step + 1), step=step)
    client.log_metric(parent, "global_val_acc", 0.5, step=0)
    client.log_metric(parent, "cross_site/m/site-1/val_acc", 0.4, step=0)
    client.log_param(site.info.run_id, "lr", "0.02")
    client.set_terminated(parent)

    out = contents(uri, "tree")
    assert sorted(out["runs"]) == ["parent", "site-1"]
    assert out["runs"]["site-1"]["series"] == {"train_loss": 3} and out["runs"]["site-1"]["params"] == {"lr": "0.02"}
    assert out["runs"]["parent"]["status"] == "FINISHED"
    assert out["runs"]["parent"]["cross_site"] == ["cross_site/m/site-1/val_acc"]
    assert out["registered"] == {} and out["logged_models"] == []


def test_an_unknown_experiment_is_one_clear_line(tmp_path):
    with pytest.raises(CliError, match="no experiment 'nope' in sqlite:"):
        contents(f"sqlite:///{tmp_path / 'mlflow.db'}", "nope")
