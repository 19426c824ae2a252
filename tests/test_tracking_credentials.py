"""Wrong MLflow credentials: a clear error on the FL server before training, nothing on the sites.

The tracking server is flctl's MLflow-server launcher with basic auth (what scripts/mlflow_server.sh
runs); it is started over a stale PID file, as after a crash, which it must see through.
"""

import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from conftest import JOB
from flctl.configure import configure_job
from flctl.mlflow_server import MlflowServer, free_port
from flctl.simulate import nvflare_simulator

pytestmark = pytest.mark.slow
WRONG_PASSWORD = "not-the-password-0123456789"


def test_refused_credentials_stop_the_job_before_training_with_one_clear_error(offline_data, tmp_path, monkeypatch):
    server_dir, port = tmp_path / "mlflow-server", free_port()
    server_dir.mkdir()
    # A stale PID file naming a live process that is not the server (the PID was reused after a crash).
    stranger = subprocess.Popen(["sleep", "120"])
    (server_dir / "server.pid").write_text(f"{stranger.pid}\n")
    said = []
    server = MlflowServer(server_dir, port, auth=True, say=said.append)
    try:
        server.start()
        assert any("stale PID file" in line for line in said)
        assert stranger.poll() is None  # not killed, not trusted
        uri = server.uri
        job = configure_job(
            JOB,
            tmp_path / "job" / "hello-lightning-mlflow",
            {"server.tracking_uri": uri, "client.data_root": str(offline_data)},
        )
        env = {**os.environ, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": WRONG_PASSWORD}
        workspace = tmp_path / "workspace"
        result = nvflare_simulator(job, workspace, 2, env=env, timeout=300)
        log = result.stdout
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
        stopped = server.stop()
        stranger.kill()
        stranger.wait()
    assert stopped and not (server_dir / "server.pid").exists()
