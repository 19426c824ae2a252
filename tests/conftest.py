import subprocess
import sys
from pathlib import Path

import pytest

from flctl import data_prep

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "hello-lightning-mlflow"

ROUNDS, SITES, EPOCHS, BATCH, LOG_EVERY = 2, 2, 1, 32, 10


@pytest.fixture(scope="session")
def offline_data(tmp_path_factory) -> Path:
    """The offline dataset, split over 2 sites (IID, seed 0): what CI trains on."""
    root = tmp_path_factory.mktemp("data") / "offline-cifar10"
    assert data_prep.main(["--data-root", str(root), "--sites", "2", "--offline"]) == 0
    return root


def run_simulator(job: Path, workspace: Path, sites: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    nvflare = Path(sys.executable).parent / "nvflare"
    cmd = [str(nvflare), "simulator", str(job), "-n", str(sites), "-t", str(sites), "-w", str(workspace)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def finished_run(offline_data, tmp_path_factory):
    """One simulator run of the job (2 sites, 2 rounds, offline data), shared by the end-to-end tests."""
    from flctl.configure import configure_job

    tmp = tmp_path_factory.mktemp("e2e")
    job = configure_job(
        JOB,
        tmp / "job" / "hello-lightning-mlflow",
        {
            "server.num_rounds": ROUNDS,
            "client.data_root": str(offline_data),
            "client.local_epochs": EPOCHS,
            "client.batch_size": BATCH,
        },
    )
    workspace = tmp / "workspace"
    result = run_simulator(job, workspace, sites=SITES)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    server = workspace / "server" / "simulate_job"
    return server, log


def tracked_runs(server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{server / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hello-lightning-mlflow")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "federation"]
    children = {r.data.tags.get("site"): r for r in runs if r.data.tags.get("role") == "site"}
    return client, parents, children


def live_processes() -> dict:
    """pid -> argv of every process on the machine (what `ps` shows); vanished ones skipped."""
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            out[int(proc.name)] = [a for a in argv if a]
    return out
