import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "hello-lightning-mlflow"
for folder in ("custom", "scripts"):
    sys.path.insert(0, str(REPO / folder))

import data_prep  # noqa: E402


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
