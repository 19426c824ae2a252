"""Prepare the continuation of a dead job, wherever it ran: recover, read, refuse or build.

    prepare(server_job_dir, job_folder, dest) -> Prepared

server_job_dir: the dead job's folder on the FL server (journal, app_server with the persisted
models); job_folder: the job's own definition (meta, app/config for server and sites); dest:
where the continuation job is written. Shared by `flctl simulate --resume` and `flctl resume`
(POC, and a provisioned FL server's host). Every refusal is a CliError of one line.
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path

from flctl.continuation_job import ContinuationRefused, check_model_class, inspect_server, write_continuation
from flctl.errors import CliError


@dataclass
class Prepared:
    job: Path  # the continuation job folder
    plan: dict  # what the tracker continues from (server.resume_plan.make_plan)
    tracking_uri: str  # where the runs are

    @property
    def rounds_left(self) -> int:
        return self.plan["num_rounds"] - self.plan["start_round"]

    def summary(self) -> str:
        best = self.plan.get("best")
        carried = f"best round {best[0]} ({self.plan['key_metric']} {best[1]:.4f})" if best else "no best round yet"
        return (
            f"resume: job {self.plan['job_id']} stopped after round {self.plan['last_round']}; rounds "
            f"{self.plan['start_round']}..{self.plan['num_rounds'] - 1} follow from its last global model, "
            f"{carried}, into its runs (parent {self.plan['run_ids'].get('__parent__')})"
        )


LOCK_WAIT_SECONDS = 15


def lock_holders(lock: Path) -> str:
    """ ": PID n (its command)" for each process with the lock file open, as far as /proc shows."""
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == str(lock):
                pid = fd.parts[2]
                command = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"PID {pid} ({command[:80].strip()})")
        except OSError:
            continue
    return f": {', '.join(sorted(set(found)))}" if found else ""


def recover_first(server_job_dir: Path, tracking_uri, say) -> None:
    """The dead job's tracking written out and its runs ended before they go on (recovery.py):
    what the journal accepted beyond MLflow's cursor is in MLflow, so the last steps are known."""
    from fl_lightning_mlflow.server.journal import JOURNAL_DIR, JournalBusy, load_state
    from fl_lightning_mlflow.server.recovery import RecoveryError, recover, summary_line

    if load_state(server_job_dir / JOURNAL_DIR).get("ended"):
        return
    # A server just killed may still be closing its files: its lock goes with its last process.
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            account = recover(server_job_dir, tracking_uri)
            break
        except JournalBusy:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            holders = lock_holders(server_job_dir / JOURNAL_DIR / "lock")
            raise CliError(
                f"{server_job_dir}: its FL server still runs (it holds the journal{holders}); stop it first"
            ) from None
        except RecoveryError as e:
            raise CliError(str(e)) from None
    say(f"recovery: {summary_line(server_job_dir, account)}")
    if sum(account.get("lost", {}).values()):
        raise CliError("the dead job's tracking is not recovered in full; run it again once MLflow is reachable")


def server_states(server, dead) -> dict:
    """{kind: the dead job's state file} for each stateful component of the job, each checked to
    end the round its global model ends (else CliError, one line: nothing starts)."""
    from fl_lightning_mlflow.server.resume_plan import APP_SERVER
    from fl_lightning_mlflow.server.server_state import ServerStateError, load_state, state_path

    found = {}
    for kind in server.stateful:
        path = state_path(dead.run_dir / APP_SERVER, kind)
        try:
            load_state(path, kind, dead.last_round)
        except ServerStateError as e:
            raise CliError(f"cannot resume exactly: {e}") from None
        found[kind] = path
    return found


def prepare(server_job_dir, job_folder, dest, tracking_uri=None, say=print) -> Prepared:
    from mlflow.tracking import MlflowClient

    from fl_lightning_mlflow.server.resume_plan import ResumeRefused, dead_job, make_plan

    server_job_dir, job_folder = Path(server_job_dir), Path(job_folder)
    try:
        server = inspect_server(job_folder)
        total = server.num_rounds
        # Refuse before recovery touches anything: nothing to resume, or state that cannot be carried.
        states = server_states(server, dead_job(server_job_dir, total, need_runs=False))
        recover_first(server_job_dir, tracking_uri, say)
        dead = dead_job(server_job_dir, total)  # again: recovery may have made the runs
        check_model_class(server, dead.state)
    except (ContinuationRefused, ResumeRefused) as e:
        raise CliError(str(e)) from None
    uri = tracking_uri or dead.state.get("tracking_uri") or ""
    if not uri or "***" in uri:
        raise CliError(f"{server_job_dir}: the job's tracking URI is not recorded in full; give it (--tracking-uri)")
    key_metric, mode = server.key_metric
    try:
        plan = make_plan(dead, MlflowClient(uri), key_metric, mode, total)
    except Exception as e:  # noqa: BLE001 - MLflow unreachable or the runs gone: one line, nothing started
        raise CliError(f"could not read the dead job's runs from MLflow ({type(e).__name__}: {str(e)[:200]})") from None
    job = write_continuation(job_folder, Path(dest), server, plan, dead.model, dead.best_model, uri, states)
    return Prepared(job, plan, uri)
