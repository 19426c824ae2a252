"""WriteQueue against real MLflow stores: batching within MLflow's limits, retry after a failure,
the journal as overflow, read back in order, and what is counted as lost when it closes."""

import logging
import socket
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from fl_lightning_mlflow.server.write_queue import WriteQueue


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: creating its schema takes seconds, a run takes milliseconds."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("queue", artifact_location=(root / "artifacts").as_uri())
    return uri, client, experiment


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_points_of_interleaved_runs_are_all_written_in_batches(store, tmp_path):
    uri, client, experiment = store
    queue = WriteQueue(uri, tmp_path / "journal", actions={})
    for site in ("site-1", "site-2"):
        queue.run_ids[site] = client.create_run(experiment).info.run_id
    for step in range(1500):  # more than one log_batch (1000 metrics) per run
        for site in ("site-1", "site-2"):
            queue.put(("metric", site, "loss", 1.0 / (step + 1), 0, step))
    queue.put(("param", "site-1", "lr", "0.01"))
    queue.put(("tag", "site-2", "trainer", "lightning"))
    assert queue.drain(60)
    assert queue.close(5) == {}
    for site in ("site-1", "site-2"):
        assert len(client.get_metric_history(queue.run_ids[site], "loss")) == 1500
    assert client.get_run(queue.run_ids["site-1"]).data.params == {"lr": "0.01"}
    assert client.get_run(queue.run_ids["site-2"]).data.tags["trainer"] == "lightning"
    assert queue.stats["written_metric"] == 3000 and queue.stats["failures"] == 0


def test_system_metrics_are_written_but_not_counted_in_the_runs_delivery_counts(store, tmp_path):
    uri, client, experiment = store
    queue = WriteQueue(uri, tmp_path / "journal", actions={})
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    queue.put(("metric", "site-1", "system/cpu_utilization_percentage", 12.5, 0, 0))
    queue.put(("metric", "site-1", "val_acc", 0.5, 0, 0))
    assert queue.drain(60) and queue.close(5) == {}
    assert queue.stats["written_metric"] == 2 and queue.written_by_run == {"site-1": 1}
    assert client.get_metric_history(queue.run_ids["site-1"], "system/cpu_utilization_percentage")[0].value == 12.5


def test_a_failed_write_is_kept_and_retried_until_it_succeeds(store, tmp_path, caplog):
    uri, client, experiment = store
    attempts = []

    def create_run(client, name):
        attempts.append(name)
        if len(attempts) < 3:
            raise ConnectionError("tracking server restarting")
        queue.run_ids[name] = client.create_run(experiment).info.run_id

    queue = WriteQueue(
        uri, tmp_path / "journal", {"create": create_run}, retry_initial=0.01, logger=logging.getLogger("wq")
    )
    with caplog.at_level(logging.INFO, logger="wq"):
        queue.put(("call", "create", ["site-1"]))
        queue.put(("metric", "site-1", "acc", 0.5, 0, 0))
        assert queue.drain(10)
    assert attempts == ["site-1"] * 3 and queue.stats["failures"] == 2
    assert caplog.text.count("MLflow write failed, will retry (items kept): ConnectionError") == 1  # logged once
    assert "MLflow writes succeed again" in caplog.text
    assert [m.value for m in client.get_metric_history(queue.run_ids["site-1"], "acc")] == [0.5]
    assert queue.close(5) == {}


def test_past_max_memory_items_new_items_live_in_the_journal_and_come_back_in_order(store, tmp_path):
    uri, client, experiment = store
    release, seen = threading.Event(), []
    actions = {"hold": lambda client: release.wait(10), "note": lambda client, i: seen.append(i)}
    spill = tmp_path / "journal"
    queue = WriteQueue(uri, spill, actions, max_memory_items=10)
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    queue.put(("call", "hold", []))  # the writer waits here while the queue fills
    for i in range(40):
        queue.put(("call", "note", [i]))
        queue.put(("metric", "site-1", "x", float(i), 0, i))
    assert queue.stats["spilled"] == 81 - 10
    assert len(queue.journal_file.read_text().splitlines()) == 81  # every item is journaled, in memory or not
    assert queue.pending() == {"call": 41, "metric": 40}
    release.set()
    assert queue.drain(30)
    assert seen == list(range(40))  # read back in the order they were put
    history = sorted(client.get_metric_history(queue.run_ids["site-1"], "x"), key=lambda m: m.step)
    assert [m.value for m in history] == [float(i) for i in range(40)]
    assert queue.cursor() == 81  # all settled
    assert queue.close(5) == {}
    assert (tmp_path / "journal" / "cursor").read_text() == "81\n"  # recorded on close


def test_what_cannot_be_written_by_close_is_counted_as_lost(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    uri = f"http://admin:s3cret-pw@127.0.0.1:{closed_port()}"
    queue = WriteQueue(uri, tmp_path / "journal", {}, retry_initial=0.05, logger=logging.getLogger("wq-lost"))
    queue.run_ids["site-1"] = "0" * 32
    with caplog.at_level(logging.WARNING, logger="wq-lost"):
        for step in range(3):
            queue.put(("metric", "site-1", "loss", 0.1, 0, step))
        queue.put(("param", "site-1", "lr", "0.1"))
        assert not queue.drain(0.5)
        lost = queue.close(timeout=0.5)
    assert lost == {"metric": 3, "param": 1}
    assert queue.stats["failures"] >= 1 and queue.last_error is not None
    assert "MLflow write failed, will retry" in caplog.text and "s3cret-pw" not in caplog.text


def test_points_for_a_run_not_created_yet_wait_for_it(store, tmp_path):
    uri, client, experiment = store
    queue = WriteQueue(uri, tmp_path / "journal", {}, retry_initial=0.01)
    queue.put(("metric", "late-site", "acc", 0.25, 0, 3))
    assert not queue.drain(0.3) and "no MLflow run for 'late-site' yet" in str(queue.last_error)
    queue.run_ids["late-site"] = client.create_run(experiment).info.run_id
    assert queue.drain(10) and queue.close(5) == {}
    assert [(m.step, m.value) for m in client.get_metric_history(queue.run_ids["late-site"], "acc")] == [(3, 0.25)]


def test_the_journal_is_synced_and_its_cursor_recorded_on_a_short_cadence(store, tmp_path):
    uri, client, experiment = store
    queue = WriteQueue(uri, tmp_path / "journal", {}, sync_seconds=0.1)
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    for step in range(50):
        queue.put(("metric", "site-1", "x", 0.5, 0, step))
    assert queue.drain(10) and queue.cursor() == 50
    cursor_file, deadline = tmp_path / "journal" / "cursor", time.monotonic() + 5
    while not (cursor_file.exists() and cursor_file.read_text() == "50\n"):
        assert time.monotonic() < deadline, "the cursor was not recorded while the queue ran"
        time.sleep(0.05)
    assert queue.stats["journal_syncs"] >= 1  # fsynced without waiting for close
    assert queue.close(5) == {}


class CountingQueue(WriteQueue):
    """Counts the requests the writer sends (our own code instrumented; MLflow is real)."""

    requests = 0

    def _write(self, items):
        type(self).requests += 1
        return super()._write(items)


def test_a_slow_producer_still_gets_full_requests(store, tmp_path):
    """Points trickling in are gathered for batch_linger instead of going out a few at a time
    (each request costs the store about as much as a full one)."""
    uri, client, experiment = store
    CountingQueue.requests = 0
    queue = CountingQueue(uri, tmp_path / "journal", actions={}, batch_linger=2.0)
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    for step in range(300):
        queue.put(("metric", "site-1", "loss", 0.5, 0, step))
        if step % 10 == 0:
            time.sleep(0.005)  # a producer slower than the writer
    assert queue.drain(60)
    assert queue.close(5) == {}
    assert len(client.get_metric_history(queue.run_ids["site-1"], "loss")) == 300
    assert CountingQueue.requests <= 5, CountingQueue.requests  # not one request per few points


def test_close_does_not_wait_out_the_linger(store, tmp_path):
    uri, client, experiment = store
    queue = WriteQueue(uri, tmp_path / "journal", actions={}, batch_linger=600.0)
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    queue.put(("metric", "site-1", "loss", 0.5, 0, 0))
    assert queue.close(60) == {}  # closing ends the wait at once: a 600 s linger would fail this
    assert len(client.get_metric_history(queue.run_ids["site-1"], "loss")) == 1


def test_points_that_arrive_while_a_request_is_out_get_a_linger_of_their_own(store, tmp_path):
    """A slow request (a slow store, a remote server) must not leave the points that arrived
    meanwhile to go out a few at a time: their linger starts when they began to wait."""
    uri, client, experiment = store
    CountingQueue.requests = 0
    slow_started = threading.Event()

    def slow(client):
        slow_started.set()
        time.sleep(0.6)  # longer than the linger

    queue = CountingQueue(uri, tmp_path / "journal", actions={"slow": slow}, batch_linger=0.4)
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    queue.put(("call", "slow", []))
    assert slow_started.wait(10)
    for step in range(300):  # arriving for about 1.5 s: while the slow request is out, and after
        queue.put(("metric", "site-1", "loss", 0.5, 0, step))
        time.sleep(0.005)
    assert queue.drain(60)
    assert queue.close(5) == {}
    assert len(client.get_metric_history(queue.run_ids["site-1"], "loss")) == 300
    # the call, then a request per linger or so; sent as soon as anything waits, it would be dozens
    assert CountingQueue.requests <= 8, CountingQueue.requests
