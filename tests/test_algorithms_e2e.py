"""The FedProx job in the real FLARE simulator: 2 sites, 2 rounds, offline data, tracked in
SQLite, through flctl simulate (configure a copy, check it, run, judge). SCAFFOLD's and FedOpt's
runs are their resume tests' (tests/test_resume_algorithms_e2e.py): a killed run and its resume
check each algorithm's exchange and records on the way."""

import pytest

from conftest import REPO
from flctl.simulate import simulate

pytestmark = pytest.mark.slow

SITES, ROUNDS = 2, 2


def run_job(job: str, offline_data, workspace):
    run = simulate(
        REPO / "jobs" / job,
        workspace,
        offline_data,
        sites=SITES,
        rounds=ROUNDS,
        epochs=1,
        extra_settings={"client.batch_size": 64, "client.log_every_n_steps": 10},
        prepare=False,
        evaluate=False,
        say=lambda msg: None,
        show=None,
        timeout=600,
    )
    assert run.outcome.ok, (run.outcome.problems, run.log[-3000:])
    assert run.outcome.rounds_done == ROUNDS and run.outcome.stats["status"] == "FINISHED"
    return run


def runs_of(server, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{server / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("role") == "federation"]
    children = {r.data.tags.get("site"): r for r in runs if r.data.tags.get("role") == "site"}
    assert parent.info.status == "FINISHED" and sorted(children) == ["site-1", "site-2"]
    assert {r.info.status for r in children.values()} == {"FINISHED"}
    return parent, children


def test_fedprox_job_trains_with_the_proximal_term_and_records_it(offline_data, tmp_path):
    run = run_job("hello-lightning-fedprox", offline_data, tmp_path)
    parent, children = runs_of(run.server_dir, "hello-lightning-fedprox")
    params = parent.data.params
    assert params["algorithm"] == "FedProx" and float(params["fedprox_mu"]) == 0.01
    assert params["num_rounds"] == str(ROUNDS) and params["lr"] == "0.02"  # the sites' settings, promoted
    for site, child in children.items():
        assert float(child.data.params["fedprox_mu"]) == 0.01, site
        assert {"train_prox_loss_step", "train_prox_loss_epoch"} <= set(child.data.metrics), site
    assert run.log.count("aggregating 2 update(s) at round") == ROUNDS  # FedAvg on the server
