"""Wrong MLflow credentials: a clear error on the FL server before training, nothing on the sites.

The tracking server is scripts/mlflow_server.sh (basic auth); it is started over a stale PID
file, as after a crash, which it must see through.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import JOB, REPO
from flctl.configure import configure_job
from flctl.mlflow_server import free_port

pytestmark = pytest.mark.slow
WRONG_PASSWORD = "not-the-password-0123456789"


def mlflow_server(*args):
    return subprocess.run(
        ["bash", str(REPO / "scripts/mlflow_server.sh"), *map(str, args)], capture_output=True, text=True, timeout=180
    )


def test_refused_credentials_stop_the_job_before_training_with_one_clear_error(offline_data, tmp_path, monkeypatch):
    server_dir, port = tmp_path / "mlflow-server", free_port()
    server_dir.mkdir()
    # A stale PID file naming a live process that is not the server (the PID was reused after a crash).
    stranger = subprocess.Popen(["sleep", "120"])
    (server_dir / "server.pid").write_text(f"{stranger.pid}\n")
    try:
        started = mlflow_server("--dir", server_dir, "--port", port, "start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "stale PID file" in started.stdout and stranger.poll() is None  # not killed, not trusted
        uri = f"http://127.0.0.1:{port}"
        job = configure_job(
            JOB,
            tmp_path / "job" / "hello-lightning-mlflow",
            {"server.tracking_uri": uri, "client.data_root": str(offline_data)},
        )
        env = {**os.environ, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": WRONG_PASSWORD}
        workspace = tmp_path / "workspace"
        nvflare = Path(sys.executable).parent / "nvflare"
        result = subprocess.run(
            [str(nvflare), "simulator", str(job), "-n", "2", "-t", "2", "-w", str(workspace)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        log = result.stdout + result.stderr
        expected = (
            f"MLflow tracking server {uri} refused the FL server (HTTP 401 Unauthorized: the credentials were "
            "refused); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
            "FL server's environment. Stopping the job before training"
        )
        server_log = (workspace / "server/log.txt").read_text()
        assert server_log.count(expected) == 1, log[-3000:]  # one error line, from FLARE's abort
        assert "training starts" not in log  # no site trained
        for site in ("site-1", "site-2"):
            site_log = (workspace / site / "log.txt").read_text() if (workspace / site / "log.txt").exists() else ""
            assert "401" not in site_log and "MLFLOW_TRACKING" not in site_log
        # The password is written nowhere in the workspace.
        for path in workspace.rglob("*"):
            if path.is_file():
                assert WRONG_PASSWORD.encode() not in path.read_bytes(), path

        # With the right credentials: the server holds no runs of this job.
        for line in (server_dir / "credentials").read_text().splitlines():
            key, _, value = line.partition("=")
            monkeypatch.setenv(key, value)
        assert MlflowClient(uri).get_experiment_by_name("hello-lightning-mlflow") is None
    finally:
        stopped = mlflow_server("--dir", server_dir, "--port", port, "stop")
        stranger.kill()
        stranger.wait()
    assert stopped.returncode == 0 and "mlflow-server: stopped" in stopped.stdout
