"""The job in the real FLARE simulator: 2 sites, 2 rounds, offline data, tracked in SQLite."""

import json
import math
import re

import pytest

from cifar10_example.data import split_path
from conftest import BATCH, EPOCHS, JOB, LOG_EVERY, ROUNDS, SITES, run_simulator, tracked_runs
from flctl.configure import configure_job
from flctl.evaluate import evaluate

pytestmark = pytest.mark.slow


def test_global_models_are_written_and_the_final_one_beats_chance(finished_run, offline_data):
    server, _ = finished_run
    assert (server / "app_server" / "FL_global_model.pt").is_file()
    # Written only when the server's key_metric matches what the sites report.
    assert (server / "app_server" / "best_FL_global_model.pt").is_file()
    metrics, n = evaluate(JOB, server / "app_server" / "FL_global_model.pt", data_root=offline_data)
    accuracy = metrics["test_acc"]
    print(f"final global model: test accuracy {accuracy:.4f} on {n} held-out images")
    assert n == 1000 and accuracy > 0.3  # chance is 0.1


def sent_points(log: str, site: str) -> int:
    match = re.search(rf"{site}: sent (\d+) metric points", log)
    assert match, f"{site} did not report its sent count"
    return int(match.group(1))


def test_mlflow_has_a_finished_run_per_site_with_params_and_metrics(finished_run, offline_data):
    server, log = finished_run
    client, parents, children = tracked_runs(server)
    assert len(parents) == 1 and sorted(children) == ["site-1", "site-2"]

    for site, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.info.run_name == site
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        params = run.data.params
        for name in ("lr", "optimizer", "momentum", "batch_size", "local_epochs", "train_samples", "split"):
            assert name in params, f"{site}: param {name} missing"
        assert params["batch_size"] == str(BATCH) and params["local_epochs"] == str(EPOCHS)

        n_train = len(json.loads(split_path(offline_data, site).read_text())["train"])
        assert params["train_samples"] == str(n_train)
        steps_per_round = EPOCHS * math.ceil(n_train / BATCH)
        expected = {
            "global_val_acc": ROUNDS,  # the received global model, once per round
            "global_val_loss": ROUNDS,
            "val_acc": ROUNDS * EPOCHS,  # the local model, each local epoch
            "val_loss": ROUNDS * EPOCHS,
            "train_loss_epoch": ROUNDS * EPOCHS,
            "train_acc_epoch": ROUNDS * EPOCHS,
            "train_loss_step": ROUNDS * (steps_per_round // LOG_EVERY),
        }
        total = 0
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            total += 0 if key.startswith("system/") else len(history)  # sampled to the job's end: apart
            # The server stamps a site's event when it arrives: points of one event share the
            # millisecond (and MLflow returns ties in any order); within an event, steps ascend.
            steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
            assert sorted(steps) == steps and len(set(steps)) == len(steps), f"{site} {key}: steps {steps}"
            if key in expected:
                assert len(history) == expected[key], f"{site} {key}: {len(history)} points, not {expected[key]}"
        assert set(expected) <= set(run.data.metrics)
        assert total == sent_points(log, site)  # every point the site sent, nothing more
        last_step = max(m.step for m in client.get_metric_history(run.info.run_id, "train_loss_epoch"))
        # Epoch-end records sit at the epoch's last batch; steps never restart at a new round.
        assert last_step == ROUNDS * steps_per_round - 1


def test_each_site_trains_on_its_own_share(finished_run):
    _, log = finished_run
    assert "site-1: 2700 train / 300 val samples" in log and "site-2: 2700 train / 300 val samples" in log
    assert log.count("aggregating 2 update(s) at round") == ROUNDS


def test_sites_running_at_once_share_the_cores(finished_run):
    import os

    _, log = finished_run
    threads = max(1, len(os.sched_getaffinity(0)) // SITES)  # -t 2: two sites at once
    assert log.count(f"{threads} torch thread(s)") == SITES


def test_a_site_without_its_split_ends_the_job_with_one_clear_line(offline_data, tmp_path):
    import shutil

    data = shutil.copytree(offline_data, tmp_path / "data")
    split_path(data, "site-2").unlink()
    job = configure_job(JOB, tmp_path / "job" / "hello-lightning-mlflow", {"client.data_root": str(data)})
    result = run_simulator(job, tmp_path / "workspace", sites=SITES, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        f"site site-2: missing split file (run scripts/prepare_data.sh with enough sites): {data}/splits/site-2.json"
        in log
    )
    # With 1 of 2 sites left, FedAvg cannot meet min_clients: the server ends the job and says why.
    assert "Cannot reach min_responses" in log
    assert not (tmp_path / "workspace/server/simulate_job/app_server/FL_global_model.pt").exists()
    # The runs tell the truth: the job failed.
    _, (parent,), children = tracked_runs(tmp_path / "workspace/server/simulate_job")
    assert parent.info.status == "FAILED" and "min_responses" in parent.data.tags["failure_reason"]
    assert {run.info.status for run in children.values()} == {"FAILED"}


def test_the_server_checks_its_tasks_as_configured(finished_run):
    """The template's task_check_period reaches FLARE's task loops (server.task_check_period)."""
    _, log = finished_run
    assert (
        "task_check_period in effect: scatter_and_gather 0.05 s (FLARE's communicator had 0.2 s), "
        "cross_site_model_eval 0.05 s (FLARE's communicator had 0.2 s)"
    ) in log
