"""The write path's named pieces on their own: queue items, lanes (fair turns, whole-job actions
keep their place), the spill reader, the run registry and the dead letter; and the queue's
fairness against a real MLflow store: one run's backlog delays another run by one request."""

import collections
import json
import logging
import threading

import pytest
from mlflow.tracking import MlflowClient

from fl_lightning_mlflow.server.dead_letter import DeadLetter
from fl_lightning_mlflow.server.journal import Journal
from fl_lightning_mlflow.server.lanes import LIMITS, Lanes, take_request
from fl_lightning_mlflow.server.queue_items import Action, MetricPoint, action, as_item, lane_of, metric, param
from fl_lightning_mlflow.server.run_registry import RunRegistry
from fl_lightning_mlflow.server.spill import SpillReader
from fl_lightning_mlflow.server.write_errors import Refused, RunNotReady
from fl_lightning_mlflow.server.write_queue import WriteQueue

LOG = logging.getLogger("lanes-test")


def test_items_are_named_types_that_journal_as_the_plain_lists_they_always_were():
    item = metric("site-1", "loss", 0.5, 1000, 3)
    assert isinstance(item, MetricPoint) and item.step == 3 and item.run_key == "site-1"
    assert json.dumps(item) == '["metric", "site-1", "loss", 0.5, 1000, 3]'
    assert as_item(["metric", "site-1", "loss", 0.5, 1000, 3]) == item
    assert as_item(("call", "terminate", ["site-1", "FINISHED"])) == Action("call", "terminate", ["site-1", "FINISHED"])
    for bad in ([], ["metric", "site-1"], ["nope", 1, 2], ["param", 5, "k", "v"], [3, "x"]):
        assert as_item(bad) is None, bad


def test_an_action_goes_to_the_lane_of_the_run_it_names_or_to_the_whole_job():
    lanes = {"terminate": 0, "log_models": "__parent__"}
    assert lane_of(action("terminate", ["site-2", "FAILED"]), lanes) == "site-2"
    assert lane_of(action("log_models", ["a.pt"]), lanes) == "__parent__"
    assert lane_of(action("setup", ["job"]), lanes) is None
    assert lane_of(action("terminate", []), lanes) is None  # malformed: waits for everything, never lost
    assert lane_of(param("site-1", "lr", "0.1"), lanes) == "site-1"


def test_lanes_take_turns_and_the_priority_run_goes_first():
    lanes = Lanes(priority="__parent__")
    for seq in range(1, 6):
        lanes.add(seq, metric("flood", "x", 1.0, 0, seq))
    lanes.add(6, metric("site-1", "x", 1.0, 0, 0))
    lanes.add(7, metric("__parent__", "g", 1.0, 0, 0))
    served = []
    while lanes.pending():
        lane, barrier = lanes.next()
        batch = take_request(lane, barrier)[:1]  # one item per request, to see the turns
        lanes.remove(lane, [pos for pos, _ in batch])
        lanes.served(lane)
        served.append(lane.key)
    assert served == ["__parent__", "flood", "site-1", "flood", "flood", "flood", "flood"]


def test_a_whole_job_action_waits_for_what_came_before_it_and_holds_what_came_after():
    lanes = Lanes()
    lanes.add(1, metric("site-1", "x", 1.0, 0, 0))
    lanes.add(2, action("setup", []))
    lanes.add(3, metric("site-1", "x", 2.0, 0, 1))
    lanes.add(4, metric("site-2", "x", 3.0, 0, 0))
    lane, barrier = lanes.next()
    assert lane.key == "site-1" and barrier == 2
    assert [item.value for _, item in take_request(lane, barrier)] == [1.0]  # not the point after the action
    lanes.remove(lane, [0])
    lane, _ = lanes.next()
    assert lane.key is None and take_request(lane, None)[0][1].name == "setup"
    lanes.remove(lane, [0])
    assert lanes.next()[0].key == "site-1" and lanes.floor() == 3


def test_a_request_keeps_to_mlflows_limits_and_leaves_a_changed_param_for_the_next():
    lanes = Lanes()
    lanes.add(1, param("site-1", "lr", "0.1"))
    lanes.add(2, param("site-1", "lr", "0.2"))
    for seq in range(3, 3 + LIMITS["metric"] + 5):
        lanes.add(seq, metric("site-1", "x", 1.0, 0, seq))
    lane, barrier = lanes.next()
    taken = take_request(lane, barrier)
    kinds = collections.Counter(item.kind for _, item in taken)
    assert kinds == {"param": 1, "metric": LIMITS["metric"]} and 1 not in [pos for pos, _ in taken]


def test_the_spill_reader_reads_one_lane_back_and_quarantines_a_torn_line_once(tmp_path):
    stats = collections.Counter()
    journal = Journal(tmp_path / "journal", stats, LOG)
    lanes = Lanes()
    items = [metric("flood" if i % 4 else "quiet", "x", float(i), 0, i) for i in range(40)]
    for item, (seq, error, pos) in zip(items, journal.append_many(items), strict=True):
        assert error is None
        lanes.add(seq, item, pos)
    journal.append_many([])  # nothing: no write
    with open(journal.path, "ab") as f:
        f.write(b'[41, "metric", "qu\n')  # torn
    reader = SpillReader(journal, {})
    quiet = lanes.runs["quiet"]
    entries, consumed, pos = reader.read("quiet", quiet.read_pos, quiet.spilled, 100, journal.path.stat().st_size)
    assert [item.value for _, item in entries] == [0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0, 32.0, 36.0]
    assert consumed == 10 and stats["quarantined"] == 1
    flood = lanes.runs["flood"]
    counts = reader.kinds("flood", flood.read_pos, flood.spilled, journal.path.stat().st_size)
    assert counts == {"metric": 30}
    reader.read("flood", flood.read_pos, flood.spilled, 100, journal.path.stat().st_size)
    assert stats["quarantined"] == 1  # the torn line is kept aside once, whichever lane met it first
    journal.close()


def test_the_registry_says_why_a_run_cannot_be_written():
    runs = RunRegistry({"site-1": "abc"}, logger=LOG)
    assert runs.run_id("site-1") == "abc" and runs.live("site-1")
    with pytest.raises(RunNotReady, match="no MLflow run for 'site-2' yet"):
        runs.run_id("site-2")
    runs.mark_dead("site-1", "run abc is deleted in MLflow")
    with pytest.raises(Refused, match="deleted"):
        runs.run_id("site-1")
    assert not runs.live("site-1")


def test_the_dead_letter_keeps_every_refusal_and_says_when_it_cannot(tmp_path, caplog):
    stats = collections.Counter()
    letter = DeadLetter(tmp_path / "dead.jsonl", stats, LOG)
    letter.record(param("site-1", "lr", "0.2"), "abc", "INVALID_PARAMETER_VALUE: changed", "INVALID_PARAMETER_VALUE")
    (entry,) = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert entry["item"] == ["param", "site-1", "lr", "0.2"] and entry["run_id"] == "abc"
    (tmp_path / "blocked").write_text("")
    broken = DeadLetter(tmp_path / "blocked" / "dead.jsonl", stats, LOG)
    with caplog.at_level(logging.ERROR, logger="lanes-test"):
        broken.record(action("boom", []), None, "ValueError: x", "ValueError")
    assert stats["dead_letter_write_failures"] == 1 and "could not record a refused item" in caplog.text


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("lanes", artifact_location=(root / "artifacts").as_uri())


class RecordingQueue(WriteQueue):
    """Records which run each request went to (our own code instrumented; MLflow is real)."""

    def _write(self, items):
        self.requests.append(items[0].run_key if items[0].kind != "call" else items[0].name)
        return super()._write(items)


@pytest.mark.parametrize("memory", [200_000, 500])  # in memory, and spilled to the journal
def test_a_flooding_runs_backlog_delays_another_run_by_one_request(store, tmp_path, memory):
    uri, client, experiment = store
    release = threading.Event()
    queue = RecordingQueue(
        uri, tmp_path / "journal", {"hold": lambda client: release.wait(10)}, max_memory_items=memory,
        call_lanes={"hold": "flood"}, priority_run="parent",
    )  # fmt: skip
    queue.requests = []
    for key in ("flood", "quiet", "parent"):
        queue.run_ids[key] = client.create_run(experiment).info.run_id
    queue.put(("call", "hold", []))  # the flood's lane is busy while the others queue up
    queue.put_many([("metric", "flood", "x", 1.0, 0, step) for step in range(20_000)])
    queue.put_many([("metric", "quiet", "loss", 0.5, 0, step) for step in range(10)])
    queue.put(("metric", "parent", "global_val_acc", 0.9, 0, 0))
    release.set()
    assert queue.drain(120) and queue.close(5) == {}
    assert queue.requests[:3] == ["hold", "parent", "quiet"]  # not after the flood's 20 requests
    assert len(client.get_metric_history(queue.run_ids["flood"], "x")) == 20_000
    assert len(client.get_metric_history(queue.run_ids["quiet"], "loss")) == 10


def test_several_writers_serve_different_runs_at_once_and_each_runs_order_holds(store, tmp_path):
    uri, client, experiment = store
    lock, out, seen = threading.Lock(), [0], collections.defaultdict(list)
    peak = [0]

    def note(client, run, i):
        with lock:
            out[0] += 1
            peak[0] = max(peak[0], out[0])
        threading.Event().wait(0.05)  # a request's round trip
        with lock:
            out[0] -= 1
            seen[run].append(i)

    queue = WriteQueue(uri, tmp_path / "journal", {"note": note}, call_lanes={"note": 0}, writers=3)
    for i in range(10):
        for run in ("a", "b", "c"):
            queue.put(("call", "note", [run, i]))
    assert queue.drain(60) and queue.close(5) == {}
    assert peak[0] == 3  # three runs' requests out at once
    assert seen == {run: list(range(10)) for run in ("a", "b", "c")}  # and each run's in its order
