"""site.threads: a site's share of the machine's cores."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_lightning_mlflow.site.threads import (
    SITES_PER_HOST_ENV,
    option,
    simulator_concurrency,
    sites_on_this_host,
    torch_threads,
    usable_cores,
)


@pytest.fixture(autouse=True)
def no_sites_per_host(monkeypatch):
    monkeypatch.delenv(SITES_PER_HOST_ENV, raising=False)


@pytest.fixture
def fake_simulator(tmp_path):
    """Start a process that stands in for the simulator: only its command line is read."""
    procs = []

    def start(*args) -> list:
        script = tmp_path / "simulator.py"
        script.write_text("import time; time.sleep(30)")
        proc = subprocess.Popen([sys.executable, str(script), *args])
        procs.append(proc)
        while str(script).encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            time.sleep(0.01)  # until exec has replaced the forked test process
        return ["simulator_worker", "--parent_pid", str(proc.pid)]  # a worker's argv

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_threads_per_site_overrides_everything(monkeypatch):
    monkeypatch.setenv(SITES_PER_HOST_ENV, "64")
    assert torch_threads(3, simulate=True, worker_argv=["worker"]) == 3


def test_a_deployed_site_has_the_machine_to_itself():
    assert sites_on_this_host(simulate=False) == 1
    assert torch_threads(0, simulate=False) == usable_cores()


def test_sites_per_host_from_the_environment_shares_the_cores(monkeypatch):
    monkeypatch.setenv(SITES_PER_HOST_ENV, "2")
    assert sites_on_this_host(simulate=False) == 2
    assert torch_threads(0) == max(1, usable_cores() // 2)
    monkeypatch.setenv(SITES_PER_HOST_ENV, str(usable_cores() * 4))
    assert torch_threads(0) == 1  # never fewer than one


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_sites_per_host_says_so_in_one_line(monkeypatch, value):
    monkeypatch.setenv(SITES_PER_HOST_ENV, value)
    with pytest.raises(ValueError, match=rf"^FL_SITES_PER_HOST must be an integer >= 1, got '{value}'$"):
        torch_threads(0)


def test_in_the_simulator_the_sites_running_at_once_share_the_cores(fake_simulator):
    worker_argv = fake_simulator("-n", "4", "-t", "2")
    assert simulator_concurrency(worker_argv) == 2
    assert torch_threads(0, simulate=True, worker_argv=worker_argv) == max(1, usable_cores() // 2)
    # Outside the simulator the same process is a deployed site.
    assert torch_threads(0, simulate=False, worker_argv=worker_argv) == usable_cores()


def test_an_unknown_parent_counts_as_one_site():
    assert simulator_concurrency(["worker"]) == 1
    assert simulator_concurrency(["worker", "--parent_pid", "not-a-pid"]) == 1
    assert simulator_concurrency(["worker", "--parent_pid", "999999999"]) == 1


def test_option_reads_both_spellings():
    argv = ["nvflare", "simulator", "job", "--threads=3", "-c", "a,b"]
    assert option(argv, "-t", "--threads") == "3"
    assert option(argv, "-c", "--clients") == "a,b"
    assert option(argv, "-n", "--n_clients") is None
