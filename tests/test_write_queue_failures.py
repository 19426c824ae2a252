"""WriteQueue and MLflowSink when things go wrong, against a real MLflow SQLite store: what MLflow
refuses for good is isolated and dead-lettered while everything else is written, a torn journal
line is quarantined, no exception stops the writer, close() never raises, and run creation and
model registration are idempotent when a reply is lost."""

import json
import logging
import socket
import subprocess
import threading
import types

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils

from fl_lightning_mlflow.common.protocol import STATS_FILE
from fl_lightning_mlflow.server.mlflow_sink import PARENT, MLflowSink
from fl_lightning_mlflow.server.model_logger import JOB_UID_TAG, ModelLogger
from fl_lightning_mlflow.server.write_queue import WriteQueue


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: creating its schema takes seconds, a run takes milliseconds."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("failures", artifact_location=(root / "artifacts").as_uri())
    return uri, client, experiment


def dead_letter(queue) -> list:
    if not queue.dead_letter_file.exists():
        return []
    return [json.loads(line) for line in queue.dead_letter_file.read_text().splitlines()]


def new_queue(uri, tmp_path, actions=None, **kwargs):
    kwargs.setdefault("retry_initial", 0.01)
    kwargs.setdefault("retry_max", 0.2)
    return WriteQueue(uri, tmp_path / "journal", actions or {}, logger=logging.getLogger("wq-failures"), **kwargs)


def test_a_refused_param_is_dead_lettered_and_every_other_item_of_every_run_is_written(store, tmp_path):
    uri, client, experiment = store
    queue = new_queue(uri, tmp_path)
    sites = ("site-1", "site-2", "site-3")
    for site in sites:
        queue.run_ids[site] = client.create_run(experiment).info.run_id
    client.log_param(queue.run_ids["site-1"], "lr", "0.1")  # a first value, already in MLflow
    for step in range(300):
        for site in sites:
            queue.put(("metric", site, "loss", 1.0 / (step + 1), 0, step))
        if step == 10:
            queue.put(("param", "site-1", "lr", "0.2"))  # changed value: MLflow refuses it for good
            queue.put(("param", "site-2", "bs", "32"))
            queue.put(("param", "site-2", "bs", "32"))  # the same param twice in one batch: sent once
            queue.put(("param", "site-3", "opt", "sgd"))
            queue.put(("param", "site-3", "opt", "adam"))  # same key, other value, same batch
            queue.put(("tag", "site-1", "trainer", "lightning"))
    assert queue.drain(30)
    assert queue.close(5) == {}
    assert queue._thread.is_alive() is False
    for site in sites:
        assert len(client.get_metric_history(queue.run_ids[site], "loss")) == 300
    assert client.get_run(queue.run_ids["site-1"]).data.params == {"lr": "0.1"}
    assert client.get_run(queue.run_ids["site-1"]).data.tags["trainer"] == "lightning"
    assert client.get_run(queue.run_ids["site-2"]).data.params == {"bs": "32"}
    assert client.get_run(queue.run_ids["site-3"]).data.params == {"opt": "sgd"}
    refused = dead_letter(queue)
    assert sorted((r["run_key"], r["item"][2], r["item"][3]) for r in refused) == [
        ("site-1", "lr", "0.2"),
        ("site-3", "opt", "adam"),
    ]
    assert all(r["error_code"] == "INVALID_PARAMETER_VALUE" for r in refused)
    assert all("Changing param values is not allowed" in r["reason"] for r in refused)  # MLflow's own words
    assert dict(queue.refused_by_run) == {"site-1": 1, "site-3": 1}
    assert queue.written_by_run == {"site-1": 301, "site-2": 302, "site-3": 301}
    assert queue.stats["refused_param"] == 2 and queue.stats["written_metric"] == 900


def test_items_of_a_deleted_run_are_dead_lettered_and_other_runs_keep_flowing(store, tmp_path):
    uri, client, experiment = store
    queue = new_queue(uri, tmp_path)
    for site in ("site-1", "site-2"):
        queue.run_ids[site] = client.create_run(experiment).info.run_id
    client.delete_run(queue.run_ids["site-1"])
    for step in range(50):
        for site in ("site-1", "site-2"):
            queue.put(("metric", site, "acc", step / 50, 0, step))
    queue.put(("param", "site-1", "lr", "0.1"))
    queue.put(("tag", "site-2", "done", "yes"))
    assert queue.drain(20)
    assert len(client.get_metric_history(queue.run_ids["site-2"], "acc")) == 50
    assert client.get_run(queue.run_ids["site-2"]).data.tags["done"] == "yes"
    refused = dead_letter(queue)
    assert len(refused) == 51 and {r["run_key"] for r in refused} == {"site-1"}
    assert all("deleted" in r["reason"] for r in refused)
    assert "site-1" in queue.dead_runs and queue.refused_by_run == {"site-1": 51}
    queue.put(("metric", "site-1", "acc", 1.0, 0, 99))  # later items of the gone run: straight to the file
    assert queue.drain(10) and queue.refused_by_run["site-1"] == 52
    assert queue.close(5) == {}


def test_a_torn_journal_line_is_quarantined_and_the_rest_is_read_back(store, tmp_path):
    uri, client, experiment = store
    hold = []

    def wait_for_release(client):
        if not hold:
            raise ConnectionError("tracking server not up yet")

    actions = {"hold": wait_for_release}
    queue = new_queue(uri, tmp_path, actions, max_memory_items=4)
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    queue.put(("call", "hold", []))  # the writer retries this while the queue spills
    for i in range(20):
        queue.put(("metric", "site-1", "x", float(i), 0, i))
    lines = queue.journal_file.read_text().splitlines(keepends=True)
    assert len(lines) == 21 and queue.stats["spilled"] == 17  # all journaled; 4 also in memory
    lines[4 + 5] = lines[4 + 5][:12] + "\n"  # torn by a crash or a full disk
    lines[4 + 9] = "{not an item}\n"
    with open(queue.journal_file, "r+") as f:  # in place, as a crash would leave it
        f.write("".join(lines))
        f.truncate()
    hold.append(True)
    assert queue.drain(20)
    assert queue.stats["quarantined"] == 2
    assert queue.quarantine_file.read_text().splitlines() == [lines[9].strip(), "{not an item}"]
    steps = sorted(m.step for m in client.get_metric_history(queue.run_ids["site-1"], "x"))
    assert steps == [i for i in range(20) if i not in (3 + 5, 3 + 9)]  # 3 items stayed in memory
    queue.put(("metric", "site-1", "after", 1.0, 0, 0))  # the writer is alive and well
    assert queue.drain(10) and queue._thread.is_alive()
    assert [m.value for m in client.get_metric_history(queue.run_ids["site-1"], "after")] == [1.0]
    assert queue.close(5) == {}


def test_an_exception_in_an_action_or_in_the_writer_itself_does_not_stop_the_writer(store, tmp_path):
    uri, client, experiment = store
    calls = []

    def flaky(client):
        calls.append("flaky")
        if calls.count("flaky") < 3:
            raise KeyError("not ready")  # neither network nor MLflow: retried, succeeds the third time

    def boom(client):
        calls.append("boom")
        raise ZeroDivisionError("a bug in an action")

    def bad(client):
        calls.append("bad")
        raise ValueError("cannot be made into a request")

    queue = new_queue(uri, tmp_path, {"boom": boom, "bad": bad, "flaky": flaky}, unknown_error_attempts=3)
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    take, broken = queue._take, []

    def take_once_broken():  # our own bookkeeping failing once
        if not broken:
            broken.append(True)
            raise RuntimeError("bookkeeping bug")
        return take()

    queue._take = take_once_broken
    for name in ("boom", "bad", "flaky"):
        queue.put(("call", name, []))
        queue.put(("metric", "site-1", name, 1.0, 0, 0))
    assert queue.drain(20) and queue._thread.is_alive()
    assert calls == ["boom"] * 3 + ["bad"] + ["flaky"] * 3  # isolated after 3 tries / at once / retried
    assert queue.stats["writer_errors"] == 1 and queue.stats["refused_call"] == 2
    assert [(r["item"][1], r["error_code"]) for r in dead_letter(queue)] == [
        ("boom", "ZeroDivisionError"),
        ("bad", "ValueError"),
    ]
    for name in ("boom", "bad", "flaky"):
        assert [m.value for m in client.get_metric_history(queue.run_ids["site-1"], name)] == [1.0]
    assert queue.close(5) == {}


def test_close_on_a_broken_queue_counts_what_is_left_and_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = new_queue(f"http://127.0.0.1:{port}", tmp_path, max_memory_items=2)
    queue.run_ids["site-1"] = "0" * 32
    for step in range(5):
        queue.put(("metric", "site-1", "loss", 0.1, 0, step))
    queue.journal_file.unlink()
    queue.journal_file.mkdir()  # the journal cannot be read any more
    lost = queue.close(timeout=0.5)
    assert lost == {"metric": 2, "unreadable": 3}  # the 3 spilled ones cannot be read back
    assert queue.close(timeout=0.1) == lost  # again: still no exception


def test_run_creation_is_idempotent_when_a_reply_is_lost_and_the_account_says_what_was_refused(store, tmp_path):
    uri, client, _ = store
    models = ModelLogger("cifar10_example.network.CifarNet", "idem-model")

    def sink_for(run_dir):
        sink = MLflowSink(uri, run_dir, "idempotent", models, retry_initial=0.01)
        artifacts = (tmp_path / "artifacts").as_uri()
        sink.start("job", "simulate_job", ["site-1", "site-2"], {}, {"num_rounds": 2}, artifacts)
        assert sink.queue.drain(20)
        return sink

    sink = sink_for(tmp_path / "job-1")
    created = dict(sink.queue.run_ids)
    assert set(created) == {PARENT, "site-1", "site-2"}
    # MLflow committed the runs but the replies were lost: the retried actions find them
    sink.queue.run_ids.clear()
    sink.queue.put(("call", "setup", ["job", None, {"job_id": "simulate_job"}]))
    sink.add_site("site-3")
    assert sink.queue.drain(20)
    assert {k: v for k, v in sink.queue.run_ids.items() if k != "site-3"} == created
    experiment = client.get_experiment_by_name("idempotent").experiment_id
    mine = client.search_runs([experiment], filter_string=f"tags.{JOB_UID_TAG} = '{sink.job_uid}'")
    assert len(mine) == 4  # parent, two sites, the late site-3: nothing twice

    other = sink_for(tmp_path / "job-2")  # the simulator again: same job id, a new job start
    assert other.queue.run_ids[PARENT] != created[PARENT]

    sink.param("site-1", "lr", "0.1")
    sink.param("site-1", "lr", "0.5")  # refused: a changed value
    sink.metrics("site-2", [("acc", 0.5, 1)], now=0)
    lost = sink.finish("FINISHED", "", {}, (tmp_path / "none.pt", tmp_path / "none.pt", None), flush_timeout=20)
    records = types.SimpleNamespace(received={}, rejected={}, truncated={})
    timings = {"max_event_seconds": 0.001, "probe_seconds": 0.0, "slowest_event": None}
    complete, message = sink.report("FINISHED", "", lost, records, timings)
    stats = json.loads((tmp_path / "job-1" / STATS_FILE).read_text())
    assert not complete and "refused 1 item" in message
    assert stats["lost"] == {} and stats["refused"] == {"site-1": 1} and stats["quarantined"] == 0
    assert stats["dead_letter"] == str(tmp_path / "job-1" / "mlflow_dead_letter.jsonl")
    for key, run_id in sink.queue.run_ids.items():
        assert client.get_run(run_id).info.status == "FINISHED", key
    assert client.get_run(created["site-1"]).data.tags["refused_items"] == "1"
    other.finish("FAILED", "stopped", {}, (tmp_path / "none.pt", tmp_path / "none.pt", None), flush_timeout=20)
    assert client.get_run(other.queue.run_ids[PARENT]).info.status == "FAILED"


def test_a_model_version_is_registered_once_when_registration_is_retried(store, tmp_path, monkeypatch):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    model = client.create_logged_model(experiment, name="best_global_model", source_run_id=run_id)
    logger = ModelLogger("cifar10_example.network.CifarNet", "registered-once")
    tags = {"job_id": "simulate_job", JOB_UID_TAG: "uid-1", "model": "best_global_model", "round": "1"}
    previous = tracking_utils._tracking_uri  # None unless a test set it: then back to the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored after the test
    mlflow.set_tracking_uri(uri)  # the registry resolves models:/ URIs with the global one (as register does)
    try:
        logger.register(client, model.model_id, run_id, tags, "champion")
        logger.register(client, model.model_id, run_id, tags, "champion")  # retried after a lost reply: found
        logger.register(client, model.model_id, run_id, {**tags, JOB_UID_TAG: "uid-2"}, "champion")  # another job
    finally:
        mlflow.set_tracking_uri(previous)
    versions = client.search_model_versions("name='registered-once'")
    assert sorted(v.tags[JOB_UID_TAG] for v in versions) == ["uid-1", "uid-2"]
    assert all(v.tags["round"] == "1" and v.run_id == run_id for v in versions)
    assert client.get_model_version_by_alias("registered-once", "champion").tags[JOB_UID_TAG] == "uid-2"


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB filesystem of the test's own (tmpfs), unmounted afterwards."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.decode().strip()}")
    yield mount
    # lazy: a test that failed with the journal still open must not leave the mount behind
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_under_the_journal_keeps_items_in_memory_and_loses_none(store, tmp_path, full_disk, caplog):
    uri, client, experiment = store
    release = []

    def hold(client):
        if not release:
            raise ConnectionError("tracking server not up yet")  # items pile up, spilling to the journal

    queue = WriteQueue(
        uri, full_disk / "journal", {"hold": hold}, max_memory_items=300, retry_initial=0.01, retry_max=0.1,
        logger=logging.getLogger("wq-disk"), dead_letter_file=tmp_path / "dead.jsonl",
    )  # fmt: skip
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    with caplog.at_level(logging.ERROR, logger="wq-disk"):
        queue.put(("call", "hold", []))
        for step in range(2000):  # about 140 KB of journal lines: the disk fills up part way
            queue.put(("metric", "site-1", "loss", 1.0 / (step + 1), 0, step))
    assert queue.stats["journal_failures"] > 0 and queue.stats["spilled"] > 0
    assert caplog.text.count("could not journal an item") == 1  # said once, counted always
    release.append(True)
    assert queue.drain(60)
    history = client.get_metric_history(queue.run_ids["site-1"], "loss")
    assert sorted(m.step for m in history) == list(range(2000))  # every point, once
    assert queue.close(5) == {}


def test_a_disk_that_fills_in_the_middle_of_a_batch_keeps_the_rest_in_memory_and_loses_none(store, tmp_path, full_disk):
    """put_many journals a batch in one write; the lines the full disk cut short are kept in
    memory, the lines on disk whole stay journaled, and every point is written once."""
    uri, client, experiment = store
    release = []

    def hold(client):
        if not release:
            raise ConnectionError("tracking server not up yet")

    queue = WriteQueue(
        uri, full_disk / "journal", {"hold": hold}, max_memory_items=300, retry_initial=0.01, retry_max=0.1,
        logger=logging.getLogger("wq-disk-batch"), dead_letter_file=tmp_path / "dead.jsonl",
    )  # fmt: skip
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    queue.put(("call", "hold", []))
    for start in range(0, 2000, 50):
        queue.put_many([("metric", "site-1", "loss", 1.0 / (s + 1), 0, s) for s in range(start, start + 50)])
    assert queue.stats["journal_failures"] > 0 and queue.stats["spilled"] > 0
    lines = (full_disk / "journal" / "items.jsonl").read_bytes().split(b"\n")
    # every line on disk parses, but the last one, which the full disk may have cut
    whole = [json.loads(line) for line in lines[:-1]]
    assert whole and all(entry[1] in ("call", "metric") for entry in whole)
    release.append(True)
    assert queue.drain(60)
    history = client.get_metric_history(queue.run_ids["site-1"], "loss")
    assert sorted(m.step for m in history) == list(range(2000))  # every point, once
    assert queue.close(5) == {}


def test_an_item_that_is_not_json_is_kept_in_memory_and_its_batch_neighbours_are_journaled(store, tmp_path):
    uri, client, experiment = store
    seen = []
    queue = WriteQueue(
        uri, tmp_path / "journal", {"note": lambda client, arg: seen.append(arg)}, retry_initial=0.01,
        logger=logging.getLogger("wq-json"), dead_letter_file=tmp_path / "dead.jsonl",
    )  # fmt: skip
    queue.run_ids["site-1"] = client.create_run(experiment).info.run_id
    odd = {1, 2}  # a set: not JSON
    queue.put_many([("call", "note", ["a"]), ("call", "note", [odd]), ("call", "note", ["c"])])
    assert queue.drain(30)
    assert seen == ["a", odd, "c"] and queue.stats["journal_failures"] == 1
    journaled = [json.loads(line) for line in (tmp_path / "journal" / "items.jsonl").read_text().splitlines()]
    assert [entry[3] for entry in journaled] == [["a"], ["c"]]
    assert [entry[0] for entry in journaled] == [1, 3]  # the odd one's seq is not reused
    assert queue.close(5) == {}


def test_new_items_do_not_cut_the_back_off_short_during_an_outage(store, tmp_path):
    """While MLflow is down the writer waits retry_initial, doubling, between attempts; items
    that keep arriving (each one wakes a writer that waits for work) must not make it retry at
    the rate they arrive."""
    uri, client, experiment = store
    attempts = []

    def hold(client):
        attempts.append(1)
        raise ConnectionError("tracking server down")

    queue = WriteQueue(
        uri, tmp_path / "journal", {"hold": hold, "noop": lambda client: None}, retry_initial=5, retry_max=5,
        logger=logging.getLogger("wq-backoff"), dead_letter_file=tmp_path / "dead.jsonl",
    )  # fmt: skip
    queue.put(("call", "hold", []))
    deadline = threading.Event()
    for _ in range(100):  # about a second of arrivals, each notifying the writer
        queue.put(("call", "noop", []))
        deadline.wait(0.01)
    assert len(attempts) <= 2, f"{len(attempts)} attempts within one back-off interval"
    queue.close(0.5)
