"""write_errors.refusal: what the write queue retries and what it isolates, from MLflow's real errors."""

import pytest
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
