"""The local PostgreSQL + `mlflow server` launcher (flctl.local_postgres, flctl.pg_mlflow_server):
its refusals in one line, and (slow) the write queue with several requests in flight into it,
on 127.0.0.1 only, with nothing left running or on disk afterwards."""

import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from flctl import processes
from flctl.errors import CliError
from flctl.local_postgres import LocalPostgres, cannot_run, unreachable_parent
from flctl.pg_mlflow_server import pg_mlflow_server


def test_missing_postgres_binaries_are_named_in_one_line_and_nothing_starts(tmp_path):
    folder = tmp_path / "server"
    with pytest.raises(CliError) as refused:
        with pg_mlflow_server(folder, bin_dir=tmp_path / "no-postgres"):
            pytest.fail("the server must not start")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("PostgreSQL is not installed: no initdb in") and "apt-get install" in message
    assert not folder.exists()  # its folder went, as after a run
    assert processes.naming(tmp_path) == {}


def test_a_folder_the_postgres_user_cannot_enter_is_named(tmp_path):
    closed = tmp_path / "closed"
    (closed / "inner").mkdir(parents=True)
    closed.chmod(0o700)
    assert unreachable_parent(closed / "inner" / "pg") == closed
    if cannot_run() is None:  # where PostgreSQL could run, start says so before trying
        with pytest.raises(CliError, match=f"cannot enter {closed}.*under /tmp"):
            LocalPostgres(closed / "inner" / "pg").start()


@pytest.mark.slow
def test_the_write_queue_keeps_each_runs_order_with_four_requests_out_at_once(tmp_path):
    if why := cannot_run():
        pytest.skip(why)
    from mlflow.tracking import MlflowClient

    from fl_lightning_mlflow.server.write_queue import WriteQueue

    steps, sent, lock = 2500, [], threading.Lock()  # 3 requests a run (1,000 metrics each)
    folder = Path(tempfile.mkdtemp(prefix="pg-mlflow-test-"))  # under /tmp: the postgres user may enter
    folder.chmod(0o755)
    with pg_mlflow_server(folder, workers=4) as stack:
        uri = stack.uri
        assert uri.startswith("http://127.0.0.1:")
        assert processes.naming(folder)  # PostgreSQL and the server run from it
        client = MlflowClient(uri)
        experiment = client.create_experiment("pg-write-queue")
        queue = WriteQueue(uri, tmp_path / "journal", actions={}, writers=4)
        for site in ("site-1", "site-2"):
            queue.run_ids[site] = client.create_run(experiment).info.run_id
        write = queue.sender.write  # the queue's _write, bound at its start

        def timed(items):  # each request: its run, its steps, when it was out
            started = time.monotonic()
            write(items)
            with lock:
                sent.append((items[0].run_key, [i.step for i in items], started, time.monotonic()))

        queue.sender.write = timed
        queue.put_many([("metric", site, "loss", 0.5, 0, s) for s in range(steps) for site in ("site-1", "site-2")])
        assert queue.drain(120) and queue.close(10) == {}
        for site in ("site-1", "site-2"):
            history = client.get_metric_history(queue.run_ids[site], "loss")
            assert sorted(m.step for m in history) == list(range(steps))
            requests = sorted((r for r in sent if r[0] == site), key=lambda r: r[2])
            assert [s for r in requests for s in r[1]] == list(range(steps))  # in order, request after request
            assert all(a[3] <= b[2] for a, b in zip(requests, requests[1:], strict=False))  # one out at a time
        overlapping = any(a[0] != b[0] and a[2] < b[3] and b[2] < a[3] for a in sent for b in sent)
        assert overlapping, "the two runs' requests never were out at once"
        cpu = stack.cpu_seconds()
        assert cpu["mlflow"] > 0 and cpu["postgres"] > 0  # both did work, counted by process tree
    assert processes.naming(folder) == {} and not folder.exists()  # all ended, all removed


@pytest.mark.slow
def test_sigterm_during_a_run_still_ends_everything_and_removes_the_folder(tmp_path):
    if why := cannot_run():
        pytest.skip(why)
    folder = Path(tempfile.mkdtemp(prefix="pg-mlflow-test-"))
    folder.chmod(0o755)
    code = (
        "import sys, time\nfrom flctl.pg_mlflow_server import pg_mlflow_server\n"
        f"with pg_mlflow_server({str(folder)!r}, workers=1) as stack:\n"
        "    print(stack.uri, flush=True)\n    time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("http://127.0.0.1:")  # up: the server answered
        assert processes.naming(folder)
        child.send_signal(signal.SIGTERM)  # as a CI timeout or kill would end a benchmark
        assert child.wait(60) == 128 + signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
    assert processes.naming(folder) == {} and not folder.exists()
