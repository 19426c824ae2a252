"""Recovery after an FL server crash: what a dead job's journal holds goes into that job's runs.

FLARE 2.9 cannot resume a job whose server died, so nothing here waits for a resume. A job's
journal (journal.py) outlives its process: state.json names the tracking URI, the run ids, the
job's uid and the last completed round; items.jsonl holds every record the server accepted;
the cursor says how far MLflow confirmed them. Recovery
  1. takes the journal's lock (a live job holds it: its journal is never touched),
  2. writes every item beyond the cursor into the same runs, in order, with the queue's rules
     (retries, refusals dead-lettered): metrics keep their original timestamp and step, so a
     point MLflow already had is not duplicated; runs not created yet are created or found by
     their tags (the job's uid), never twice,
  3. ends the parent and site runs FAILED with failure_reason naming the last completed round,
  4. marks the journal ended (unless something could not be written: then the next recovery
     tries again) and writes mlflow_recovery.json beside it with the counts.
It runs by itself when the next job starts on the same FL server (the tracker looks for
orphaned journals in the server's workspace), and as `flctl recover WORKSPACE`.
"""

import json
import logging
import sys
import time
from pathlib import Path

from fl_lightning_mlflow.server.journal import JOURNAL_DIR, JournalBusy, load_state
from fl_lightning_mlflow.server.mlflow_sink import PARENT, MLflowSink
from fl_lightning_mlflow.server.model_logger import ModelLogger

RECOVERY_FILE = "mlflow_recovery.json"
SERVER_CUSTOM = ("app_server", "custom")  # in a job's folder: the code FLARE shipped to the server


class RecoveryError(Exception):
    """A journal that cannot be recovered as it is (one line: what and where)."""


def orphaned_journals(server_workspace, exclude=None) -> list:
    """Job folders under server_workspace whose journal did not end (their process may still be
    alive: recover() checks the lock). exclude: a job folder to leave out (the caller's own)."""
    found = []
    for state_file in sorted(Path(server_workspace).glob(f"*/{JOURNAL_DIR}/state.json")):
        run_dir = state_file.parent.parent
        if exclude is not None and run_dir.resolve() == Path(exclude).resolve():
            continue
        state = load_state(state_file.parent)
        if state and not state.get("ended"):
            found.append(run_dir)
    return found


def failure_reason(state: dict) -> str:
    last = state.get("last_round")
    where = f"after round {last} (the last completed round)" if last is not None else "before any round completed"
    return f"the FL server stopped {where}; tracking recovered from its journal"


def recover(run_dir, tracking_uri=None, timeout: float = 300.0, logger=None) -> dict:
    """Recover one dead job's tracking; returns the account (also written to RECOVERY_FILE).
    Raises JournalBusy when a live process holds the journal, RecoveryError when it cannot be
    recovered as it is (no state, a redacted URI and none given)."""
    run_dir = Path(run_dir)
    journal_dir = run_dir / JOURNAL_DIR
    state = load_state(journal_dir)
    if not state or not state.get("job_uid"):
        raise RecoveryError(f"{journal_dir}: no readable state.json: not a tracking journal")
    if state.get("ended"):
        return {"job_id": state.get("job_id"), "status": "already ended", "replayed": 0}
    uri = tracking_uri or state.get("tracking_uri") or ""
    if not uri or "***" in uri:
        raise RecoveryError(f"{journal_dir}: the job's tracking URI is not recorded in full; give it (--tracking-uri)")
    log = logger or logging.getLogger(__name__)
    started = time.monotonic()
    # The job's own code first on the path: its models are built from the user's module class.
    custom = run_dir.joinpath(*SERVER_CUSTOM)
    if custom.is_dir() and str(custom) not in sys.path:
        sys.path.insert(0, str(custom))
    models = ModelLogger(state.get("model_spec"), state.get("experiment_name") or "")
    if isinstance(state.get("model_input"), list) and len(state["model_input"]) == 2:
        models.input_spec = (tuple(state["model_input"][0]), state["model_input"][1])
    sink = MLflowSink(
        uri, run_dir, state.get("experiment_name") or "hello-lightning-mlflow", models, logger=log, resume=state
    )  # raises JournalBusy while the job's process lives
    queue = sink.queue
    replayed = queue.resumed
    # First what the journal holds (it may create the runs), then the ends, for the runs there are.
    queue.drain(timeout)
    reason = failure_reason(state)
    for key in [*sink.sites, PARENT]:
        if key in queue.run_ids and key not in queue.dead_runs:
            sink.tags(key, [("failure_reason", reason)])
            queue.put(("call", "terminate", [key, "FAILED"]))
    left = max(1.0, timeout - (time.monotonic() - started))
    drained = queue.drain(left)
    lost = queue.close(timeout=5 if drained else 1)
    account = {
        "job_id": state.get("job_id"),
        "status": "FAILED",
        "failure_reason": reason,
        "last_round": state.get("last_round"),
        "replayed": replayed,
        "written": {k.removeprefix("written_"): v for k, v in queue.stats.items() if k.startswith("written_")},
        "refused": dict(queue.refused_by_run),
        "quarantined": queue.stats["quarantined"],
        "lost": dict(lost),
        "run_ids": dict(queue.run_ids),
        "seconds": round(time.monotonic() - started, 3),
    }
    if not sum(lost.values()):
        sink.ended = True  # done: later recoveries leave it alone
    sink.save_state()
    try:
        (run_dir / RECOVERY_FILE).write_text(json.dumps(account, indent=2, default=str))
    except OSError as e:
        log.error(f"recovery: could not write {run_dir / RECOVERY_FILE}: {e}")
    return account


def summary_line(run_dir, account: dict) -> str:
    written = sum(v for k, v in account.get("written", {}).items() if k != "call")
    lost = sum(account.get("lost", {}).values())
    return (
        f"job {account.get('job_id')}: {account.get('replayed')} journaled item(s) beyond the cursor, "
        f"{written} point(s) written, {sum(account.get('refused', {}).values())} refused, {lost} lost; "
        f"runs {account.get('status')} ({account.get('failure_reason')}); account in {Path(run_dir) / RECOVERY_FILE}"
    )


def recover_workspace(server_workspace, exclude=None, tracking_uri=None, timeout=300.0, logger=None, say=None) -> list:
    """recover() every orphaned journal under server_workspace; returns [(run_dir, account or
    the reason it was left)]. Never raises."""
    log = logger or logging.getLogger(__name__)
    say = say or log.info
    results = []
    for run_dir in orphaned_journals(server_workspace, exclude):
        try:
            account = recover(run_dir, tracking_uri, timeout, log)
            say(f"recovery: {summary_line(run_dir, account)}")
            results.append((run_dir, account))
        except JournalBusy:
            results.append((run_dir, "in use by a live process"))
        except Exception as e:  # noqa: BLE001 - one bad journal must not stop the others
            why = f"{type(e).__name__}: {e}"
            say(f"recovery: {run_dir}: not recovered ({why})")
            results.append((run_dir, why))
    return results
