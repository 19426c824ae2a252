"""The write path's parts that its queue tests reach only through the queue, each on its own,
against a real MLflow SQLite store: the request sender's isolation, the writer loop's threads, the
run tree's idempotent creation, the stats report's marks, and the site's budget rule."""

import collections
import json
import logging

import pytest
from mlflow.tracking import MlflowClient

from fl_lightning_mlflow.common.stream_budget import StreamBudget
from fl_lightning_mlflow.server.dead_letter import DeadLetter
from fl_lightning_mlflow.server.mlflow_sink import PARENT, MLflowSink
from fl_lightning_mlflow.server.model_logger import ModelLogger
from fl_lightning_mlflow.server.queue_items import Outcome, metric, param
from fl_lightning_mlflow.server.records import RecordChecker
from fl_lightning_mlflow.server.request_sender import RequestSender
from fl_lightning_mlflow.server.run_registry import RunRegistry
from fl_lightning_mlflow.server.stats_report import write_report
from fl_lightning_mlflow.server.write_queue import WriteQueue
from fl_lightning_mlflow.site.budget_rule import BudgetRule

LOG = logging.getLogger("write-path-parts")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("parts", artifact_location=(root / "artifacts").as_uri())


def test_the_sender_writes_a_batch_and_isolates_what_mlflow_refuses(store, tmp_path):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    client.log_param(run_id, "lr", "0.1")
    runs, stats = RunRegistry({"site-1": run_id}, logger=LOG), collections.Counter()
    sender = RequestSender(None, runs, DeadLetter(tmp_path / "dead.jsonl", stats, LOG), 3)
    sender.write = lambda items: sender.write_items(items, {})
    sender.client = client
    items = [metric("site-1", "loss", 0.5, 0, 0), param("site-1", "lr", "0.2"), param("site-1", "bs", "8")]
    batch = list(enumerate(items))
    outcome = {}
    sender.send(batch, outcome)
    assert outcome == {0: Outcome.WRITTEN, 1: Outcome.REFUSED, 2: Outcome.WRITTEN}
    assert client.get_run(run_id).data.params == {"lr": "0.1", "bs": "8"}
    (entry,) = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert entry["item"] == ["param", "site-1", "lr", "0.2"] and entry["error_code"] == "INVALID_PARAMETER_VALUE"


def test_the_sender_dead_letters_every_item_of_a_deleted_run_without_a_request_each(store, tmp_path):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    client.delete_run(run_id)
    runs, stats = RunRegistry({"gone": run_id}, logger=LOG), collections.Counter()
    sender = RequestSender(None, runs, DeadLetter(tmp_path / "dead.jsonl", stats, LOG), 3)
    sent = []
    sender.write = lambda items: (sent.append(len(items)), sender.write_items(items, {}))
    sender.client = client
    outcome = {}
    sender.send(list(enumerate(metric("gone", "x", float(i), 0, i) for i in range(8))), outcome)
    assert set(outcome.values()) == {Outcome.REFUSED} and len(outcome) == 8
    assert sent == [8] and "gone" in runs.dead  # one request, then the run is known gone


def test_the_writer_loop_runs_the_writers_it_is_asked_for(store, tmp_path):
    uri, client, experiment = store
    queue = WriteQueue(uri, tmp_path / "journal", {}, writers=2)
    assert len(queue._threads) == 2 and all(t.is_alive() for t in queue._threads)
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    queue.put(("metric", "site-1", "x", 1.0, 0, 0))
    assert queue.drain(10) and queue.close(5) == {}
    assert not any(t.is_alive() for t in queue._threads)
    assert WriteQueue(uri, tmp_path / "j2", {}).close(5) == {}  # one writer for a database store


def test_the_run_tree_finds_the_runs_an_earlier_attempt_made_and_the_report_marks_throttled_sites(store, tmp_path):
    uri, client, _ = store
    sink = MLflowSink(uri, tmp_path / "run", "tree-and-report", ModelLogger(None, "m"), logger=LOG)
    sink.start("job", "job-1", ["site-1"], {}, {})
    assert sink.queue.drain(30)
    first = dict(sink.queue.run_ids)
    sink.queue.run_ids.clear()  # as if the replies were lost: the tree finds the runs by their tags
    sink.tree.setup(client, "job", None, {})
    assert dict(sink.queue.run_ids) == first
    sink.queue.close(5)
    table = {"site-1": {"sent": 10, "throttled": 7, "written": 10, "lost": 0}}
    ok, line = write_report(sink.queue, tmp_path / "stats.json", "FINISHED", None, collections.Counter(),
                            RecordChecker(warn=LOG.warning), {"max_event_seconds": 0.0, "probe_seconds": 0.0,
                            "slowest_event": None}, {"delivery": table})  # fmt: skip
    assert ok and line.startswith("MLflow: all written")
    assert json.loads((tmp_path / "stats.json").read_text())["delivery"] == table
    assert client.get_run(first["site-1"]).data.tags["throttled_points"] == "7"
    assert "throttled_points" not in client.get_run(first[PARENT]).data.tags


def test_the_budget_rule_lets_the_first_points_out_and_holds_the_rest():
    rule = BudgetRule(StreamBudget(0.001, 3))
    assert rule.metrics({"a": 1, "b": 2}) == {"a": 1, "b": 2}
    assert rule.metrics({"c": 3, "d": 4}) == {"c": 3}
    assert rule.metrics({"e": 5}) == {} and rule.budget.throttled == 2
    assert rule.streams_only and rule.column == "throttled"


def test_a_run_mlflow_refuses_to_create_is_marked_dead_and_a_network_error_is_not(tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from fl_lightning_mlflow.server.run_tree import RunTree

    runs = RunRegistry({"site-1": "abc"}, logger=LOG)
    tree = RunTree(None, runs)
    tree.refused(ConnectionError("down"), ["site-2"])  # retried later: not dead
    assert runs.dead == {}
    tree.refused(MlflowException("experiment deleted", error_code=INVALID_PARAMETER_VALUE), ["site-1", "site-2"])
    assert list(runs.dead) == ["site-2"] and "run not created" in runs.dead["site-2"]  # site-1 exists already


def test_a_rounds_model_is_saved_beside_the_journal_and_queued_only_for_its_round(tmp_path):
    import numpy as np

    from fl_lightning_mlflow.server.model_policy import ROUND_MODELS_DIR, queue_round_model

    class Sink:
        run_dir, queued = tmp_path, []

        def round_model(self, path, fl_round):
            self.queued.append((path.name, fl_round))

    sink, weights = Sink(), {"w": np.ones(3, dtype=np.float32)}
    assert queue_round_model(sink, (1, weights), 2, LOG) is None and sink.queued == []  # another round's copy
    assert queue_round_model(sink, None, 2, LOG) is None and sink.queued == []
    queue_round_model(sink, (2, weights), 2, LOG)
    assert sink.queued == [("round_2.pt", 2)] and (tmp_path / ROUND_MODELS_DIR / "round_2.pt").is_file()
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    sink.run_dir = blocked  # its folder cannot be made: said as a warning, nothing raised
    assert queue_round_model(sink, (3, weights), 3, LOG) is None and len(sink.queued) == 1


def test_the_writer_loop_starts_the_threads_it_is_asked_for_and_at_least_one():
    from fl_lightning_mlflow.server.writer_loop import WriterLoop

    class Idle:  # a queue with nothing to take, closing: each thread ends at once
        sender, stats = object(), {"writer_errors": 0}

        def _take(self):
            return None

    idle = Idle()
    loop = WriterLoop(idle, 0.01, 0.1)
    threads = loop.start(3)
    assert [t.name for t in threads] == ["mlflow-writer-0", "mlflow-writer-1", "mlflow-writer-2"]
    assert len(loop.start(0)) == 1
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads) and loop.last_error is None
    assert idle.stats["writer_errors"] == 0  # each ended by finding nothing, not by an error
