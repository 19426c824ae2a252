"""Tracking URI checks, redaction, and the start-of-job probe through MLflow's own client against
real sockets: a closed port, and a small local HTTP server answering as an auth proxy would."""

import http.server
import json
import os
import socket
import threading
import time

import mlflow.tracking  # noqa: F401 - imported up front so the probe timings measure the probe only
import pytest

from fl_lightning_mlflow.server.tracking_uri import (
    TrackingConfigError,
    check_server,
    check_tracking_uri,
    probe_tracking_server,
    redact_uri,
)

CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch):
    for name in CREDENTIALS:
        monkeypatch.delenv(name, raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def answering(request):
    """A local HTTP server that answers every request with (status, body): plain text as MLflow's
    basic-auth layer answers, or JSON as MLflow itself does. Yields its URI."""
    status, body = request.param

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "uri",
    ["sqlite:////tmp/x/mlflow.db", "http://127.0.0.1:5000", "https://mlflow.example.org", "postgresql+psycopg2://h/db"],
)
def test_uris_mlflow_can_track_to_are_accepted(uri):
    assert check_tracking_uri(uri) == uri


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("file:///tmp/mlruns", "MLflow >= 3.13 refuses file stores"),
        ("/tmp/mlruns", "MLflow >= 3.13 refuses file stores"),
        ("ftp://user:pw-123@host/x", "unsupported scheme 'ftp'"),
    ],
)
def test_other_uris_are_refused_with_one_line_and_no_credentials(uri, why):
    with pytest.raises(TrackingConfigError) as refused:
        check_tracking_uri(uri)
    message = str(refused.value)
    assert why in message and "\n" not in message and "pw-123" not in message


def test_redaction_drops_only_the_user_info():
    assert redact_uri("https://admin:secret@mlflow.example.org:5000/x") == "https://***@mlflow.example.org:5000/x"
    assert redact_uri("see http://tok@h:1 and http://h:2") == "see http://***@h:1 and http://h:2"
    assert redact_uri("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_a_closed_port_is_unreachable_at_once_and_mlflows_settings_are_restored(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    started = time.monotonic()
    verdict, detail = probe_tracking_server(f"http://user:pw-123@127.0.0.1:{closed_port()}")
    assert time.monotonic() - started < 3  # no retry window (MLflow's default: minutes)
    assert verdict == "unreachable" and "Connection refused" in detail and "pw-123" not in detail
    assert "\n" not in detail
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


NOT_AUTHENTICATED = (401, "You are not authenticated. Please see the documentation.")


@pytest.mark.parametrize("answering", [NOT_AUTHENTICATED], indirect=True)
def test_401_without_credentials_is_refused_and_says_none_were_set(answering):
    assert probe_tracking_server(answering) == ("refused", "HTTP 401 Unauthorized: no credentials were set")


@pytest.mark.parametrize("answering", [NOT_AUTHENTICATED], indirect=True)
def test_401_with_credentials_is_refused_and_never_shows_them(answering, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-123")
    assert probe_tracking_server(answering) == ("refused", "HTTP 401 Unauthorized: the credentials were refused")


@pytest.mark.parametrize(
    "answering", [(403, {"error_code": "PERMISSION_DENIED", "message": "no access"})], indirect=True
)
def test_mlflows_own_permission_error_is_refused(answering, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123")
    assert probe_tracking_server(answering) == ("refused", "HTTP 403 Forbidden: the credentials were refused")


@pytest.mark.parametrize("answering", [(200, {"experiments": []})], indirect=True)
def test_a_server_that_answers_is_ok(answering):
    assert probe_tracking_server(answering) == ("ok", "")


@pytest.mark.parametrize("answering", [(404, "not here")], indirect=True)
def test_a_server_side_error_is_not_a_verdict_on_the_credentials(answering):
    assert probe_tracking_server(answering) == ("ok", "HTTP 404 Not Found")


@pytest.mark.parametrize("answering", [(503, "backend down")], indirect=True)
def test_a_proxy_without_mlflow_behind_it_is_unreachable_at_once(answering):
    started = time.monotonic()
    assert probe_tracking_server(answering) == ("unreachable", "HTTP 503 Service Unavailable")
    assert time.monotonic() - started < 3  # MLflow's retries of 503 are off for the probe


@pytest.mark.parametrize("answering", [NOT_AUTHENTICATED], indirect=True)
def test_the_start_check_says_refused_in_the_line_the_readme_quotes(answering, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-123")
    uri = answering.replace("http://", "http://admin:pw-123@")
    verdict, message = check_server(uri)
    shown = answering.replace("http://", "http://***@")
    assert verdict == "refused" and message.startswith(
        f"MLflow tracking server {shown} refused the FL server (HTTP 401 Unauthorized: the credentials were "
        "refused); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
        "FL server's environment. Stopping the job before training"
    )
    assert "pw-123" not in message


def test_the_start_check_lets_training_go_on_when_the_server_is_unreachable_or_a_database():
    uri = f"http://127.0.0.1:{closed_port()}"
    verdict, message = check_server(uri)
    assert verdict == "unreachable" and message.startswith(f"MLflow tracking server {uri} unreachable (")
    assert message.endswith("); training goes on, data is kept and retried")
    assert check_server("sqlite:////tmp/none.db") == ("ok", "")


def test_temporary_env_sets_for_the_block_and_restores_what_was_there(monkeypatch):
    from fl_lightning_mlflow.server.tracking_uri import temporary_env

    monkeypatch.setenv("FLTEST_KEPT", "before")
    monkeypatch.delenv("FLTEST_NEW", raising=False)
    with pytest.raises(RuntimeError), temporary_env({"FLTEST_KEPT": "during", "FLTEST_NEW": "x"}):
        assert os.environ["FLTEST_KEPT"] == "during" and os.environ["FLTEST_NEW"] == "x"
        raise RuntimeError("the block fails")  # restored all the same
    assert os.environ["FLTEST_KEPT"] == "before" and "FLTEST_NEW" not in os.environ


INVALID_HOST = (403, "Invalid Host header - possible DNS rebinding attack detected")


@pytest.mark.parametrize("answering", [INVALID_HOST], indirect=True)
def test_a_host_the_server_does_not_accept_is_named_not_blamed_on_the_credentials(answering, monkeypatch):
    """MLflow's server answers 403 to a Host header it does not know, before any credential is
    looked at: the line says so and names the server's setting, not the FL server's credentials."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-123")
    verdict, detail = probe_tracking_server(answering)
    assert verdict == "refused" and "credentials" not in detail
    assert "--allowed-hosts" in detail and "MLFLOW_SERVER_ALLOWED_HOSTS" in detail
    verdict, message = check_server(answering)
    assert verdict == "refused" and "MLFLOW_TRACKING_USERNAME" not in message
    assert message.endswith("Stopping the job before training: nothing could be tracked")


def test_the_tracker_takes_flares_receiver_arguments_and_refuses_bad_ones_in_one_line(caplog):
    """What configs written from FLARE's own templates pass to MLflowReceiver builds here too."""
    import logging

    from fl_lightning_mlflow.server.tracker import FederatedMLflowTracker

    with caplog.at_level(logging.INFO):
        tracker = FederatedMLflowTracker(artifact_location="artifacts", buffer_flush_time=1, metric_modes={"x": "min"})
    assert tracker.requested_artifacts == "artifacts"
    assert any("buffer_flush_time=1 (MLflowReceiver's flush interval) has nothing to set" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    for args, message in (
        ({"artifact_location": ""}, "artifact_location must be a path or URI, got ''"),
        ({"buffer_flush_time": "soon"}, "buffer_flush_time must be a number of seconds, got 'soon'"),
        ({"metric_modes": {"global_val_loss": "lower"}}, 'metric_modes must map metric names to "max" or "min"'),
    ):
        with pytest.raises(TrackingConfigError) as refused:
            FederatedMLflowTracker(**args)
        assert str(refused.value).startswith(message)
