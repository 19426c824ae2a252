"""Recovery after an FL server crash, on a real SQLite MLflow store: a process tracking a job is
SIGKILLed mid-job; recovery then writes what its journal holds beyond the cursor into the same
runs, once, and ends them FAILED naming the last completed round."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from fl_lightning_mlflow.server.journal import CURSOR, JOURNAL_DIR, load_state
from fl_lightning_mlflow.server.mlflow_sink import PARENT, MLflowSink
from fl_lightning_mlflow.server.model_logger import ModelLogger
from fl_lightning_mlflow.server.recovery import (
    RECOVERY_FILE,
    RecoveryError,
    orphaned_journals,
    recover,
    recover_workspace,
)
from flctl.cli import main

# A job's tracking in its own process: round 0 confirmed and the cursor recorded; then round 1's
# points are accepted (journaled) and the process is killed before the cursor moves again.
JOB = """
import os, signal, sys, time
from pathlib import Path
from fl_lightning_mlflow.server.mlflow_sink import PARENT, MLflowSink
from fl_lightning_mlflow.server.model_logger import ModelLogger
run_dir, uri = Path(sys.argv[1]), sys.argv[2]
sink = MLflowSink(uri, run_dir, "recovery-test", ModelLogger("x.Y", "m"), sync_seconds=60)
sink.start("job", "job-1", ["site-1", "site-2"], {}, {"num_rounds": 2})
def round_points(r):
    for site in ("site-1", "site-2"):
        sink.metrics(site, [("train_loss", 1.0 / (r * 10 + s + 1), r * 10 + s) for s in range(10)], 1000 + r)
    sink.param("site-1", "lr", "0.01")
    sink.metrics(PARENT, [("global_val_acc", 0.5 + r / 10)], 2000 + r, step=r)
round_points(0)
sink.round_done(0)
assert sink.queue.drain(30)
sink.queue.journal.sync()  # the cursor now covers round 0
round_points(1)  # accepted and journaled; MLflow may or may not have them when the process dies
if sys.argv[3] == "torn":
    with open(sink.queue.journal_file, "ab") as f:
        f.write(b'[999, "metric", "site-1", "tr')  # a write the crash cut short
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An SQLite store with MLflow's tables, made once (its migrations take seconds) and copied."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def crashed_job(tmp_path, store, how="clean"):
    run_dir, db = tmp_path / "server" / "job-1", tmp_path / "mlflow.db"
    run_dir.mkdir(parents=True)
    shutil.copy(store, db)
    uri = f"sqlite:///{db}"
    proc = subprocess.run([sys.executable, "-c", JOB, str(run_dir), uri, how], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return run_dir, uri


def series(client, run_id, key):
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def test_a_killed_job_is_recovered_into_its_own_runs_once_and_ended_failed(tmp_path, empty_store):
    run_dir, uri = crashed_job(tmp_path, empty_store)
    journal = run_dir / JOURNAL_DIR
    state = load_state(journal)
    assert state["last_round"] == 0 and not state["ended"] and set(state["run_ids"]) == {PARENT, "site-1", "site-2"}
    assert int((journal / CURSOR).read_text()) > 0
    assert orphaned_journals(tmp_path / "server") == [run_dir]

    account = recover(run_dir, timeout=60)
    assert account["replayed"] == 2 * 10 + 1 + 1  # round 1: 20 site points, a param, a global point
    assert account["lost"] == {} and account["refused"] == {} and account["status"] == "FAILED"
    assert json.loads((run_dir / RECOVERY_FILE).read_text())["replayed"] == account["replayed"]

    client = MlflowClient(uri)
    runs = {key: client.get_run(run_id) for key, run_id in state["run_ids"].items()}  # the same runs
    assert len(client.search_runs([runs[PARENT].info.experiment_id])) == 3  # none made twice
    for run in runs.values():
        assert run.info.status == "FAILED"
        assert run.data.tags["failure_reason"] == (
            "the FL server stopped after round 0 (the last completed round); tracking recovered from its journal"
        )
    for site in ("site-1", "site-2"):
        points = series(client, runs[site].info.run_id, "train_loss")
        # every point of both rounds once, with its original step and timestamp
        assert points == sorted([(r * 10 + s, 1.0 / (r * 10 + s + 1), 1000 + r) for r in (0, 1) for s in range(10)])
    assert series(client, runs[PARENT].info.run_id, "global_val_acc") == [(0, 0.5, 2000), (1, 0.6, 2001)]

    # Done once: the journal is ended; another recovery finds nothing to do.
    assert load_state(journal)["ended"] and orphaned_journals(tmp_path / "server") == []
    assert recover(run_dir)["status"] == "already ended"


def test_a_line_torn_by_the_crash_is_quarantined_and_counted_and_the_rest_recovered(tmp_path, empty_store):
    run_dir, uri = crashed_job(tmp_path, empty_store, "torn")
    account = recover(run_dir, timeout=60)
    assert account["quarantined"] == 1 and account["lost"] == {} and account["replayed"] == 23
    assert (run_dir / JOURNAL_DIR / "quarantine.jsonl").read_text().startswith('[999, "metric"')
    client = MlflowClient(uri)
    site = load_state(run_dir / JOURNAL_DIR)["run_ids"]["site-1"]
    assert len(series(client, site, "train_loss")) == 20


def test_a_journal_held_by_a_live_job_is_left_alone(tmp_path, empty_store):
    run_dir = tmp_path / "server" / "job-2"
    shutil.copy(empty_store, tmp_path / "m.db")
    sink = MLflowSink(f"sqlite:///{tmp_path / 'm.db'}", run_dir, "live", ModelLogger("x.Y", "m"))
    try:
        sink.start("job", "job-2", ["site-1"], {}, {})
        assert orphaned_journals(tmp_path / "server") == [run_dir]  # not ended ...
        assert recover_workspace(tmp_path / "server") == [(run_dir, "in use by a live process")]  # ... but alive
        assert orphaned_journals(tmp_path / "server", exclude=run_dir) == []
    finally:
        sink.finish("FINISHED", "", {}, (tmp_path / "none.pt", tmp_path / "none.pt", None), 10)
    assert load_state(run_dir / JOURNAL_DIR)["ended"] and orphaned_journals(tmp_path / "server") == []


def test_a_journal_that_cannot_be_recovered_as_it_is_says_why_in_one_line(tmp_path):
    (tmp_path / "job" / JOURNAL_DIR).mkdir(parents=True)
    with pytest.raises(RecoveryError, match="no readable state.json: not a tracking journal"):
        recover(tmp_path / "job")
    (tmp_path / "job" / JOURNAL_DIR / "state.json").write_text(
        json.dumps({"job_uid": "u", "tracking_uri": "http://***@host:5000", "ended": False})
    )
    with pytest.raises(RecoveryError, match=r"tracking URI is not recorded in full; give it \(--tracking-uri\)"):
        recover(tmp_path / "job")
    results = recover_workspace(tmp_path)
    assert len(results) == 1 and "RecoveryError" in results[0][1]


@pytest.mark.slow  # waits out retries against a closed port
def test_a_recovery_that_cannot_reach_mlflow_counts_what_is_left_and_a_later_one_finishes(
    tmp_path, monkeypatch, empty_store
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    run_dir, uri = crashed_job(tmp_path, empty_store)
    t = time.monotonic()
    account = recover(run_dir, tracking_uri="http://127.0.0.1:9", timeout=2)  # nothing listens there
    assert time.monotonic() - t < 30
    # round 1's points, and the failure tags and run ends recovery added for the 3 runs
    assert account["lost"] == {"metric": 21, "param": 1, "tag": 3, "call": 3}
    assert not load_state(run_dir / JOURNAL_DIR)["ended"]
    account = recover(run_dir, timeout=60)  # the store is back: everything beyond the cursor, once
    assert account["lost"] == {} and account["replayed"] >= 22
    site = load_state(run_dir / JOURNAL_DIR)["run_ids"]["site-2"]
    assert len(series(MlflowClient(uri), site, "train_loss")) == 20
    assert os.path.exists(run_dir / RECOVERY_FILE)


def test_flctl_recover_recovers_a_server_workspace_and_says_so(tmp_path, empty_store, capsys):
    run_dir, uri = crashed_job(tmp_path, empty_store)
    assert main(["recover", str(tmp_path / "server")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "recovery: job job-1: 22 journaled item(s) beyond the cursor, 25 point(s) written, 0 refused, 0 lost"
    )
    assert "runs FAILED (the FL server stopped after round 0" in out
    assert main(["recover", str(run_dir)]) == 0  # one job's folder works too; nothing left to do
    assert capsys.readouterr().out.strip() == f"recover: nothing to recover in {run_dir}"
    assert main(["recover", str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().err.strip() == f"flctl recover: no folder {tmp_path / 'absent'}"


def test_the_tracker_recovers_dead_jobs_of_its_server_at_job_start_but_not_its_own(tmp_path, empty_store):
    from fl_lightning_mlflow.server.tracker import FederatedMLflowTracker

    run_dir, uri = crashed_job(tmp_path, empty_store)
    own = tmp_path / "server" / "job-2"
    (own / JOURNAL_DIR).mkdir(parents=True)
    (own / JOURNAL_DIR / "state.json").write_text(json.dumps({"job_uid": "u2", "tracking_uri": uri, "ended": False}))
    FederatedMLflowTracker()._recover(tmp_path / "server", own)  # what initialize() starts in a thread
    assert load_state(run_dir / JOURNAL_DIR)["ended"]
    assert json.loads((run_dir / RECOVERY_FILE).read_text())["replayed"] == 22
    assert not load_state(own / JOURNAL_DIR)["ended"] and not (own / RECOVERY_FILE).exists()
