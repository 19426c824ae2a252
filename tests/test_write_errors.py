"""write_errors.refusal: what the write queue retries and what it isolates, from MLflow's real errors."""

import http.server
import threading

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from fl_lightning_mlflow.server.write_errors import Refused, RunNotReady, refusal
from flctl.mlflow_server import free_port


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}")


def raised(call) -> BaseException:
    with pytest.raises(Exception) as caught:
        call()
    return caught.value


def test_a_changed_param_value_is_refused_for_good_with_mlflows_reason(client):
    run = client.create_run(client.create_experiment("changed-param"))
    client.log_param(run.info.run_id, "lr", "0.1")
    reason = refusal(raised(lambda: client.log_param(run.info.run_id, "lr", "0.2")))
    assert reason.startswith("INVALID_PARAMETER_VALUE: ") and "Changing param values is not allowed" in reason


def test_a_missing_run_is_refused_for_good(client):
    reason = refusal(raised(lambda: client.get_run("0" * 32)))
    assert reason.startswith("RESOURCE_DOES_NOT_EXIST: ")


def test_an_unreachable_server_is_worth_retrying(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    unreachable = MlflowClient(f"http://127.0.0.1:{free_port()}")
    assert refusal(raised(lambda: unreachable.search_experiments(max_results=1))) is None


@pytest.mark.parametrize(
    "error,expected",
    [
        (MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), None),  # HTTP 503
        (ConnectionError("reset by peer"), None),
        (TimeoutError("timed out"), None),
        (RunNotReady("no run yet"), None),
        (Refused("run 1 is deleted in MLflow"), "run 1 is deleted in MLflow"),
        (ValueError("could not convert"), "ValueError: could not convert"),
        (KeyError("bug in an action"), "?"),  # retried a few times, then isolated
    ],
)
def test_each_kind_of_failure_is_classified(error, expected):
    assert refusal(error) == expected


class Answering(http.server.BaseHTTPRequestHandler):
    """A server on 127.0.0.1 that answers every request with the status and body it is given
    (what a proxy, a rate limiter or an overloaded tracking server sends back)."""

    status, body = 503, b"Service Unavailable"

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "status,body,retried",
    [
        (429, b"Too Many Requests", True),
        (503, b"Service Unavailable", True),
        (502, b"<html>Bad Gateway</html>", True),
        (500, b'{"error_code": "INTERNAL_ERROR", "message": "database is locked"}', True),
        (400, b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "Changing param values is not allowed"}', False),
    ],
)
def test_http_answers_from_a_real_server_are_classified(monkeypatch, status, body, retried):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries: the queue retries
    handler = type("Handler", (Answering,), {"status": status, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = MlflowClient(f"http://127.0.0.1:{server.server_address[1]}")
        reason = refusal(raised(lambda: client.log_batch("0" * 32, metrics=[Metric("m", 1.0, 0, 0)])))
    finally:
        server.shutdown()
        server.server_close()
    assert (reason is None) == retried, reason
    if not retried:
        assert reason == "INVALID_PARAMETER_VALUE: Changing param values is not allowed"
