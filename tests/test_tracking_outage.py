"""A real tracking server that goes away: nothing lost, nothing on the event thread waits.

Each test starts its own `mlflow server` on 127.0.0.1 (SQLite backend, artifacts in a temp
folder) and runs the job in the simulator against it over HTTP.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import JOB
from fl_lightning_mlflow.common.protocol import STATS_FILE
from flctl.configure import configure_job
from flctl.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

# MLflow's own HTTP retry window, shortened so an outage outlasts it quickly (about 3 s here).
SHORT_RETRY_WINDOW = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
}
OUTAGE_SECONDS = 20


def start_job(offline_data, tmp_path, uri, rounds):
    job = configure_job(
        JOB,
        tmp_path / "job" / "hello-lightning-mlflow",
        {"server.num_rounds": rounds, "server.tracking_uri": uri, "client.data_root": str(offline_data)},
    )
    log = open(tmp_path / "simulator.log", "w")
    cmd = [str(Path(sys.executable).parent / "nvflare"), "simulator", str(job), "-n", "2", "-t", "2"]
    cmd += ["-w", str(tmp_path / "workspace")]
    env = {**os.environ, **SHORT_RETRY_WINDOW}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for_log(tmp_path, pattern, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = (tmp_path / "simulator.log").read_text()
        if re.search(pattern, text):
            return text
        assert proc.poll() is None, f"simulator ended early:\n{text[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in the simulator log after {timeout} s")


def finish(proc, timeout=400):
    try:
        assert proc.wait(timeout) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def assert_every_point_arrived(tmp_path, uri):
    log = (tmp_path / "simulator.log").read_text()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("hello-lightning-mlflow")
    runs = client.search_runs([experiment.experiment_id])
    counts = {}
    for run in runs:
        site = run.data.tags.get("site")
        if site:
            keys = [k for k in run.data.metrics if not k.startswith("system/")]  # sampled to the end: apart
            counts[site] = sum(len(client.get_metric_history(run.info.run_id, k)) for k in keys)
    sent = {site: int(n) for site, n in re.findall(r"(site-\d+): sent (\d+) metric points", log)}
    stats = json.loads((tmp_path / "workspace/server/simulate_job" / STATS_FILE).read_text())
    slowest = stats["max_event_seconds"] * 1000
    print(f"points sent {sent}, received {counts}; retried writes {stats['write_failures']}, slowest {slowest:.1f} ms")
    assert counts == sent and len(sent) == 2
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert stats["lost"] == {}
    assert stats["max_event_seconds"] < 0.1, stats["slowest_event"]
    return stats


def test_server_down_at_start_then_killed_mid_run_loses_nothing(offline_data, tmp_path):
    """One run, both outages: the server is not up when the job starts (it comes up once round
    0 has trained); once writes succeed again it is killed (SIGKILL, as in a crash) while the
    sites train and restarted after OUTAGE_SECONDS, longer than MLflow's own retry window."""
    server = MlflowServer(tmp_path / "mlflow")  # not started yet
    proc = start_job(offline_data, tmp_path, server.uri, rounds=4)
    try:
        wait_for_log(tmp_path, r"MLflow write failed, will retry", proc, timeout=120)
        wait_for_log(tmp_path, r"round 0: global model", proc)
        server.start()
        wait_for_log(tmp_path, r"MLflow writes succeed again", proc, timeout=120)
        server.kill()
        down_at = time.monotonic()
        # The writer logs a failure again once it has succeeded in between.
        wait_for_log(tmp_path, r"succeed again(.|\n)*MLflow write failed, will retry", proc, timeout=60)
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        server.start()
        finish(proc)
        stats = assert_every_point_arrived(tmp_path, server.uri)
        assert stats["write_failures"] >= 2  # both outages really hit the write path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        server.stop()
