"""A simulator run of 5 rounds is SIGKILLed (every process of it) after round 2, as a machine
dies; `flctl simulate --resume` then trains rounds 3 and 4 from the last global model into the
same MLflow runs: one parent, global metrics at steps 0..4 once each, every site series strictly
increasing in step, all runs FINISHED, the champion the best of all five rounds."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import BATCH, JOB, LOG_EVERY, SITES, tracked_runs
from fl_lightning_mlflow.server.journal import JOURNAL_DIR, load_state
from flctl import processes
from flctl.sim_resume import SERVER_JOB, resume_simulation

pytestmark = pytest.mark.slow

ROUNDS, KILL_AFTER = 5, 2
RUN = """
import json, sys
from flctl.simulate import simulate
simulate(sys.argv[1], sys.argv[2], sys.argv[3], sites=int(sys.argv[4]), rounds=int(sys.argv[5]), epochs=1,
         extra_settings=json.loads(sys.argv[6]), prepare=False, check=False, evaluate=False, show=None, timeout=600)
"""
SETTINGS = {"client.batch_size": BATCH, "client.log_every_n_steps": LOG_EVERY, "client.system_metrics_seconds": 2}


def run_and_kill_after_round(workspace, data_root, kill_after: int, timeout: float = 400, job=JOB, sites=SITES,
                             rounds=ROUNDS, settings=None):  # fmt: skip
    """flctl simulate's own path in a process of its own; once the server's journal says round
    kill_after completed, SIGKILL it and everything it started (found by the workspace they name).
    settings: job settings beside SETTINGS (benchmarks/resume_accuracy.py gives the seed)."""
    settings = json.dumps({**SETTINGS, **(settings or {})})
    args = [str(job), str(workspace), str(data_root), str(sites), str(rounds), settings]
    proc = subprocess.Popen([sys.executable, "-c", RUN, *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            latest = workspace / "latest"
            state = load_state(latest / SERVER_JOB / JOURNAL_DIR) if latest.exists() else {}
            if (state.get("last_round") or -1) >= kill_after:
                run_dir = latest.resolve()
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail(f"round {kill_after} did not complete within {timeout} s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_all_naming(workspace)
    return run_dir


def kill_all_naming(workspace, within: float = 20) -> None:
    """SIGKILL every process naming the workspace until none is left (a killed one may have
    been starting another, and one just killed takes a moment to go)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = [pid for pid in processes.naming(workspace) if processes.alive(pid)]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    pytest.fail(f"processes of the killed run still alive: {processes.naming(workspace)}")


def strictly_increasing(history) -> bool:
    steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
    return all(a < b for a, b in zip(steps, steps[1:], strict=False))


def test_a_killed_simulator_run_resumes_into_its_own_runs(offline_data, tmp_path):
    workspace = tmp_path / "ws"
    killed = run_and_kill_after_round(workspace, offline_data, KILL_AFTER)
    server = killed / SERVER_JOB
    assert not (server / "mlflow_tracking_stats.json").exists()  # it did not end by itself

    run, plan, uri = resume_simulation(killed, evaluate=False, say=print, show=None, timeout=600)
    assert run.outcome.ok, (run.outcome.problems, run.log[-3000:])
    assert plan["last_round"] == KILL_AFTER and plan["start_round"] == KILL_AFTER + 1
    assert uri == f"sqlite:///{server / 'mlflow.db'}"

    client, parents, children = tracked_runs(server)
    assert len(parents) == 1 and parents[0].info.run_id == plan["run_ids"]["__parent__"]
    assert {site: r.info.run_id for site, r in children.items()} == {
        k: v for k, v in plan["run_ids"].items() if k != "__parent__"
    }
    for r in [*parents, *children.values()]:
        assert r.info.status == "FINISHED", (r.data.tags.get("site"), r.data.tags)
        assert r.data.tags.get("continued_by_job") == "simulate_job"
        assert "failure_reason" not in r.data.tags and "interrupted" in r.data.tags
    parent = parents[0]
    acc = client.get_metric_history(parent.info.run_id, "global_val_acc")
    assert sorted(m.step for m in acc) == list(range(ROUNDS))
    for site, r in children.items():
        last = 0
        for key in r.data.metrics:
            history = client.get_metric_history(r.info.run_id, key)
            assert strictly_increasing(history), (site, key, [(m.timestamp, m.step) for m in history])
            last = max([last] + [m.step for m in history])
        assert last >= plan["step_offsets"][site] > 0  # the continuation's points came after the killed run's

    # The champion is the best of all five rounds (round 0 never is: FLARE's selector skips it).
    by_round = {m.step: m.value for m in acc if m.step >= 1}
    best_round = max(by_round, key=lambda r: (by_round[r], -r))
    stats = json.loads((run.server_dir / "mlflow_tracking_stats.json").read_text())
    assert stats["best_model"]["round"] == best_round, (stats["best_model"], by_round)
    assert (run.server_dir / "app_server" / "best_FL_global_model.pt").is_file()
