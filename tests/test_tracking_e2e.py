"""The federation in MLflow after a 2-site simulator run: run tree, global metrics per round,
FL params, the registered global model, the cross-site matrix, and the write path's accounting."""

import json

import mlflow
import mlflow.artifacts
import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ROUNDS, SITES, tracked_runs
from fl_lightning_mlflow.common.protocol import MAX_KEY_LENGTH, MAX_PARAM_VALUE_LENGTH, STATS_FILE

pytestmark = pytest.mark.slow


def test_parent_run_holds_one_global_point_per_round_with_each_site_beside_it(finished_run):
    server, _ = finished_run
    client, (parent,), children = tracked_runs(server)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "hello-lightning-mlflow"
    tags = parent.data.tags
    assert tags["job_id"] and tags["sites"] == "site-1,site-2"
    for lib in ("nvflare", "pytorch-lightning", "mlflow", "torch"):
        assert tags[f"{lib}_version"]
    for key in ("global_val_acc", "global_val_loss", "contributing_sites"):
        history = client.get_metric_history(parent.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(ROUNDS)), key
    for fl_round in range(ROUNDS):
        per_site = {}
        for site, run in children.items():
            site_history = client.get_metric_history(parent.info.run_id, f"global_val_acc/{site}")
            per_site[site] = next(m.value for m in site_history if m.step == fl_round)
            own = client.get_metric_history(run.info.run_id, "global_val_acc")
            assert per_site[site] == pytest.approx(sorted(own, key=lambda m: m.step)[fl_round].value)
        mean = next(
            m.value for m in client.get_metric_history(parent.info.run_id, "global_val_acc") if m.step == fl_round
        )
        # equal validation sets here, so the sample-weighted mean is the plain mean
        assert mean == pytest.approx(sum(per_site.values()) / SITES)
        # fairness beside it: the worst site and the spread, from the same per-site values
        fairness = {
            name: next(m.value for m in client.get_metric_history(parent.info.run_id, name) if m.step == fl_round)
            for name in ("global_val_acc/worst_site", "global_val_acc/spread")
        }
        assert fairness["global_val_acc/worst_site"] == pytest.approx(min(per_site.values()))
        assert fairness["global_val_acc/spread"] == pytest.approx(max(per_site.values()) - min(per_site.values()))
    assert {m.value for m in client.get_metric_history(parent.info.run_id, "contributing_sites")} == {SITES}


def test_params_hold_the_fl_configuration_within_mlflow_limits(finished_run):
    server, _ = finished_run
    _, (parent,), children = tracked_runs(server)
    params = parent.data.params
    assert params["num_rounds"] == str(ROUNDS) and params["min_clients"] == str(SITES)
    for name in ("local_epochs", "aggregation", "split", "seed", "key_metric"):
        assert name in params, name
    for run in [parent, *children.values()]:
        assert len(run.data.params) <= 100
        for key, value in run.data.params.items():
            assert len(key) <= MAX_KEY_LENGTH and len(value) <= MAX_PARAM_VALUE_LENGTH


def test_best_global_model_is_registered_loads_and_predicts(finished_run):
    server, _ = finished_run
    client, (parent,), _ = tracked_runs(server)
    (version,) = client.search_model_versions("name='hello-lightning-mlflow-global'")
    assert version.run_id == parent.info.run_id
    assert int(version.tags["round"]) in range(1, ROUNDS)  # the selector skips round 0
    assert 0 < float(version.tags["key_metric_value"]) <= 1
    # The parent run's mean is the number that chose this model (the selector's weights).
    history = client.get_metric_history(parent.info.run_id, "global_val_acc")
    (at_best,) = [m.value for m in history if m.step == int(version.tags["round"])]
    assert at_best == float(version.tags["key_metric_value"])
    mlflow.set_tracking_uri(f"sqlite:///{server / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"models:/hello-lightning-mlflow-global/{version.version}")
    with torch.no_grad():
        assert model(torch.randn(8, 3, 32, 32)).shape == (8, 10)
    final = mlflow.pytorch.load_model(f"runs:/{parent.info.run_id}/final_global_model")
    with torch.no_grad():
        assert final(torch.randn(5, 3, 32, 32)).shape == (5, 10)


def test_cross_site_matrix_is_in_the_parent_run(finished_run):
    server, _ = finished_run
    client, (parent,), _ = tracked_runs(server)
    models = ("SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", "site-1", "site-2")
    for model in models:
        for site in ("site-1", "site-2"):
            assert f"cross_site/{model}/{site}/val_acc" in parent.data.metrics, (model, site)
    mlflow.set_tracking_uri(f"sqlite:///{server / 'mlflow.db'}")
    table = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/cross_site_validation.json")
    assert len(table["data"]) == len(models) * SITES * 2  # val_acc and val_loss


def test_nothing_lost_and_the_event_thread_never_waited(finished_run):
    server, log = finished_run
    stats = json.loads((server / STATS_FILE).read_text())
    assert stats["lost"] == {} and stats["rejected"] == {}
    assert stats["max_event_seconds"] < 0.1
    received = sum(c.get("metric", 0) for c in stats["received"].values())
    assert received > 0
    # Delivery, counted end to end: what each site's task results said it sent is what MLflow wrote.
    delivery = stats["delivery"]
    assert sorted(delivery) == ["site-1", "site-2"]
    for site, row in delivery.items():
        assert row["sent"] == row["written"] == row["received"] > 0 and row["lost"] == row["in_flight"] == 0, row
        assert row["refused"] == row["rejected"] == 0, row
        assert row["sent_by_kind"]["param"] > 0  # params are counted too, not only metric points
        # the site's own END_RUN count of metric points agrees with what its last task result said
        assert f"{site}: sent {row['sent_by_kind']['metric']} metric points" in log
    line = "; ".join(f"{site} sent {row['sent']}, written {row['written']}" for site, row in delivery.items())
    assert f"delivery: {line}" in log
    _, (parent,), _ = tracked_runs(server)
    for site, row in delivery.items():
        for column in ("sent", "received", "written", "refused", "lost"):
            assert parent.data.metrics[f"delivery/{site}/{column}"] == row[column], (site, column)


def test_plain_pytorch_job_lands_in_the_same_run_tree(offline_data, tmp_path):
    from conftest import REPO, run_simulator
    from flctl.configure import configure_job

    job = configure_job(
        REPO / "jobs" / "hello-pt-mlflow", tmp_path / "hello-pt-mlflow", {"client.data_root": str(offline_data)}
    )
    result = run_simulator(job, tmp_path / "workspace", sites=SITES)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    server = tmp_path / "workspace" / "server" / "simulate_job"
    client = MlflowClient(f"sqlite:///{server / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hello-pt-mlflow")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("role") == "federation"]
    children = {r.data.tags["site"]: r for r in runs if r.data.tags.get("role") == "site"}
    assert sorted(children) == ["site-1", "site-2"] and parent.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "global_val_acc")) == [0, 1]
    for site, run in children.items():
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["trainer"] == "plain PyTorch loop"
        assert {"lr", "optimizer", "batch_size", "local_epochs", "train_samples"} <= set(run.data.params)
        local = client.get_metric_history(run.info.run_id, "local_accuracy")
        assert len(local) == ROUNDS and len({m.step for m in local}) == ROUNDS
        total = sum(len(client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics)
        assert f"{site}: sent {total} metric points" in log
    assert client.search_model_versions("name='hello-pt-mlflow-global'")


def test_the_shared_run_is_of_a_job_made_from_the_template_shipping_only_the_package(template_job, finished_run):
    # Every end-to-end test above reads this run: the template's job trains and tracks.
    assert sorted(p.name for p in (template_job / "app/custom").iterdir()) == ["fl_lightning_mlflow"]
    assert (template_job / "app/custom/fl_lightning_mlflow/site/executor.py").is_file()
    server, _ = finished_run
    _, (parent,), children = tracked_runs(server)
    assert parent.info.status == "FINISHED" and sorted(children) == ["site-1", "site-2"]
