"""The federation in MLflow after a 2-site simulator run: run tree, global metrics per round,
FL params, the registered global model, the cross-site matrix, and the write path's accounting."""

import json
import re

import mlflow
import mlflow.artifacts
import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar10_example.data import split_path
from cifar10_example.network import CifarNet
from conftest import ROUNDS, SITES, tracked_runs
from fl_lightning_mlflow.common.protocol import MAX_KEY_LENGTH, MAX_PARAM_VALUE_LENGTH, STATS_FILE
from fl_lightning_mlflow.server.dataset_inputs import CONTEXT_TAG

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


def test_every_round_global_model_is_a_logged_model_with_the_rounds_metrics_linked(finished_run):
    server, _ = finished_run  # run with log_models every_round
    client, (parent,), _ = tracked_runs(server)
    experiment = parent.info.experiment_id
    models = client.search_logged_models(experiment_ids=[experiment])
    rounds = {int(m.tags["fl_round"]): m for m in models if m.tags["fl_model"] == "round"}
    (final,) = [m for m in models if m.tags["fl_model"] == "final"]
    assert sorted(rounds) == list(range(ROUNDS)) and final.tags["fl_round"] == str(ROUNDS)
    assert {m.source_run_id for m in models} == {parent.info.run_id} and {m.name for m in models} == {"global_model"}
    outputs = {o.model_id: o.step for o in client.get_run(parent.info.run_id).outputs.model_outputs}
    for fl_round, model in rounds.items():
        assert outputs[model.model_id] == fl_round
        linked = {m.key: m for m in model.metrics}
        # the round's global metrics, the very points on the parent run at step = round
        for key in ("global_val_acc", "global_val_loss", "global_val_acc/worst_site", "fl/round_duration_seconds"):
            (point,) = [m for m in client.get_metric_history(parent.info.run_id, key) if m.step == fl_round]
            assert linked[key].value == point.value and linked[key].step == fl_round, key
    assert not final.metrics and outputs[final.model_id] == ROUNDS


def test_champion_and_final_aliases_resolve_and_the_champion_predicts(finished_run):
    server, log = finished_run
    client, (parent,), _ = tracked_runs(server)
    name = "hello-lightning-mlflow-global"
    champion = client.get_model_version_by_alias(name, "champion")
    final = client.get_model_version_by_alias(name, "final")
    assert len(client.search_model_versions(f"name='{name}'")) == 2 and champion.version != final.version
    assert champion.run_id == final.run_id == parent.info.run_id
    assert int(champion.tags["round"]) in range(1, ROUNDS)  # the selector skips round 0
    assert 0 < float(champion.tags["key_metric_value"]) <= 1 and final.tags["round"] == str(ROUNDS)
    # The parent run's mean is the number that chose this model (the selector's weights).
    history = client.get_metric_history(parent.info.run_id, "global_val_acc")
    (at_best,) = [m.value for m in history if m.step == int(champion.tags["round"])]
    assert at_best == float(champion.tags["key_metric_value"])
    # the champion is the LoggedModel of its round, not a copy
    (best_round,) = [
        m
        for m in client.search_logged_models(experiment_ids=[parent.info.experiment_id])
        if m.tags["fl_model"] == "round" and m.tags["fl_round"] == champion.tags["round"]
    ]
    assert champion.source == f"models:/{best_round.model_id}"
    mlflow.set_tracking_uri(f"sqlite:///{server / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"models:/{name}@champion")
    with torch.no_grad():
        assert model(torch.randn(8, 3, 32, 32)).shape == (8, 10)
    saved = torch.load(server / "app_server" / "best_FL_global_model.pt", weights_only=True)
    saved = saved.get("model", saved)
    assert all(torch.equal(torch.as_tensor(saved[k]), v) for k, v in model.state_dict().items())
    stats = json.loads((server / STATS_FILE).read_text())
    assert stats["registered_model"]["uris"]["champion"] == f"models:/{name}@champion"


def test_each_site_run_has_its_datasets_as_inputs(finished_run, offline_data):
    server, _ = finished_run
    client, _, children = tracked_runs(server)
    children = {site: client.get_run(run.info.run_id) for site, run in children.items()}
    for site, run in children.items():
        inputs = {next(t.value for t in d.tags if t.key == CONTEXT_TAG): d.dataset for d in run.inputs.dataset_inputs}
        assert sorted(inputs) == ["training", "validation"], site
        split = json.loads(split_path(offline_data, site).read_text())
        for context, part in (("training", "train"), ("validation", "val")):
            dataset = inputs[context]
            profile = json.loads(dataset.profile)
            assert profile["num_samples"] == len(split[part]) == sum(profile["label_histogram"].values())
            assert dataset.name == f"{site}-{part}" and len(dataset.digest) == 16
            assert json.loads(dataset.source) == {"uri": str(offline_data)}
    digests = {run.inputs.dataset_inputs[0].dataset.digest for run in children.values()}
    assert len(digests) == len(children)  # different data, different digests


def test_each_site_run_has_system_metrics_and_the_parent_the_federation_timings(finished_run):
    server, _ = finished_run
    client, (parent,), children = tracked_runs(server)
    for site, run in children.items():
        for key in (
            "system/cpu_utilization_percentage",
            "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage",
        ):
            history = client.get_metric_history(run.info.run_id, key)
            assert len(history) >= 2, (site, key)
            steps = [m.step for m in sorted(history, key=lambda m: m.timestamp)]
            assert steps == list(range(len(steps))), (site, key)  # MLflow's sampler numbers them so too
        memory = client.get_metric_history(run.info.run_id, "system/system_memory_usage_percentage")
        assert all(0 < m.value <= 100 for m in memory)
    for key in ("fl/round_duration_seconds", "fl/slowest_site_wait_seconds", "fl/update_size_bytes"):
        history = client.get_metric_history(parent.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(ROUNDS)), key
    sizes = client.get_metric_history(parent.info.run_id, "fl/update_size_bytes")
    one_update = sum(v.numel() * 4 for v in CifarNet().state_dict().values())  # float32 differences
    assert {m.value for m in sizes} == {SITES * one_update}
    durations = client.get_metric_history(parent.info.run_id, "fl/round_duration_seconds")
    waits = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "fl/slowest_site_wait_seconds")}
    assert all(0 <= waits[m.step] < m.value for m in durations)


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
    # The default, recorded: every site's model and the global models (server.cross_site_eval).
    assert parent.data.tags["cross_site_models"] == "all"
    assert {row[table["columns"].index("evaluated")] for row in table["data"]} == {"all"}


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
        # system metrics: monitoring, outside the table; the server received at most what was sampled
        sampled = int(re.search(rf"{site}: sent (\d+) system metric points", log).group(1))
        assert 0 < stats["system_metrics"][site] <= sampled
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
        keys = [k for k in run.data.metrics if not k.startswith("system/")]  # sampled to the end: apart
        total = sum(len(client.get_metric_history(run.info.run_id, k)) for k in keys)
        assert f"{site}: sent {total} metric points" in log
    assert client.search_model_versions("name='hello-pt-mlflow-global'")


def test_the_shared_run_is_of_a_job_made_from_the_template_shipping_only_the_package(template_job, finished_run):
    # Every end-to-end test above reads this run: the template's job trains and tracks, with the
    # package and the code of the model it names (the CIFAR-10 example's, the template's default).
    assert sorted(p.name for p in (template_job / "app/custom").iterdir()) == ["cifar10_example", "fl_lightning_mlflow"]
    assert (template_job / "app/custom/fl_lightning_mlflow/site/executor.py").is_file()
    assert (template_job / "app/custom/cifar10_example/lit_module.py").is_file()
    server, _ = finished_run
    _, (parent,), children = tracked_runs(server)
    assert parent.info.status == "FINISHED" and sorted(children) == ["site-1", "site-2"]
