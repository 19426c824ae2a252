import subprocess
from pathlib import Path

import pytest

from flctl import data_prep
from flctl.processes import live_processes  # noqa: F401 - tests import it from here
from flctl.simulate import nvflare_simulator, simulate

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "hello-lightning-mlflow"

ROUNDS, SITES, EPOCHS, BATCH, LOG_EVERY = 2, 2, 1, 32, 10


@pytest.fixture(scope="session")
def offline_data(tmp_path_factory) -> Path:
    """The offline dataset, split over 2 sites (IID, seed 0): what CI trains on."""
    root = tmp_path_factory.mktemp("data") / "offline-cifar10"
    data_prep.prepare(root, sites=2, offline=True, say=lambda msg: None)
    return root


def run_simulator(job: Path, workspace: Path, sites: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`nvflare simulator` on a job folder as it is (stdout holds the whole log)."""
    return nvflare_simulator(job, workspace, sites, timeout=timeout)


@pytest.fixture(scope="session")
def finished_run(offline_data, tmp_path_factory):
    """One simulator run of the job (2 sites, 2 rounds, offline data), shared by the end-to-end tests:
    flctl simulate's own path (configure a copy, check it, run, judge from the tracker's stats file)."""
    run = simulate(
        JOB,
        tmp_path_factory.mktemp("e2e"),
        offline_data,
        sites=SITES,
        rounds=ROUNDS,
        epochs=EPOCHS,
        extra_settings={"client.batch_size": BATCH, "client.log_every_n_steps": LOG_EVERY},
        prepare=False,
        evaluate=False,
        say=lambda msg: None,
        show=None,
        timeout=600,
    )
    assert run.outcome.ok, (run.outcome.problems, run.log[-3000:])
    assert run.outcome.rounds_done == ROUNDS
    return run.server_dir, run.log


def tracked_runs(server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{server / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hello-lightning-mlflow")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "federation"]
    children = {r.data.tags.get("site"): r for r in runs if r.data.tags.get("role") == "site"}
    return client, parents, children
