"""Recover the MLflow tracking of jobs whose FL server died, from their journals.

    flctl recover WORKSPACE [--tracking-uri URI] [--credentials FILE] [--timeout S]

WORKSPACE is the FL server's workspace (in POC: .../prod_00/server; in the simulator:
.../simulator/server) or one job's folder in it. Every job there whose journal did not end and
whose process is gone is written into its own MLflow runs (what the journal accepted beyond
MLflow's confirmed cursor, once), and its runs end FAILED naming the last completed round.
A job whose process still runs is left alone. Credentials come from the environment
(MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN) or --credentials, as for the FL server.
Exits non-zero when a journal could not be recovered in full.

The same recovery runs by itself when the next job starts on that FL server.
"""

import os
from pathlib import Path

from flctl.errors import CliError, positive_int
from flctl.mlflow_server import CREDENTIAL_VARS, read_env_file


def recover_tracking(workspace, tracking_uri=None, timeout=300, say=print) -> list:
    """recover every orphaned journal under workspace (or the one job folder given); returns
    [(job folder, account or why it was left)]. CliError when there is no such folder."""
    from fl_lightning_mlflow.server.journal import JOURNAL_DIR
    from fl_lightning_mlflow.server.recovery import recover_workspace

    workspace = Path(workspace).expanduser().resolve()
    if not workspace.is_dir():
        raise CliError(f"no folder {workspace}")
    if (workspace / JOURNAL_DIR).is_dir():  # one job's folder
        found = recover_workspace(workspace.parent, tracking_uri=tracking_uri, timeout=timeout, say=say)
        return [(run_dir, result) for run_dir, result in found if run_dir == workspace]
    return recover_workspace(workspace, tracking_uri=tracking_uri, timeout=timeout, say=say)


def register(subparsers) -> None:
    p = subparsers.add_parser("recover", help="recover tracking after an FL server crash", description=__doc__)
    p.add_argument("workspace", help="the FL server's workspace, or one job folder in it")
    p.add_argument("--tracking-uri", help="write there instead of the URI the job recorded")
    p.add_argument("--credentials", help="MLFLOW_TRACKING_USERNAME=/PASSWORD= file (else the environment)")
    p.add_argument("--timeout", type=positive_int, default=300, help="seconds per job to keep retrying (default 300)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.credentials:
        try:
            found = {k: v for k, v in read_env_file(args.credentials).items() if k in CREDENTIAL_VARS}
        except OSError as e:
            raise CliError(f"cannot read credentials file {args.credentials} ({e.strerror})") from None
        os.environ.update(found)  # this process is the FL server's stand-in
    results = recover_tracking(args.workspace, args.tracking_uri, args.timeout, say=print)
    if not results:
        print(f"recover: nothing to recover in {args.workspace}")
        return 0
    failed = []
    for run_dir, result in results:
        if isinstance(result, str):
            if result == "in use by a live process":
                print(f"recover: {run_dir}: left alone (its job is still running)")
            else:
                failed.append(f"{run_dir.name}: {result}")
        elif sum(result.get("lost", {}).values()):
            failed.append(f"{run_dir.name}: {sum(result['lost'].values())} item(s) still unwritten")
    if failed:
        raise CliError("not recovered in full: " + "; ".join(failed) + " (run it again once MLflow is reachable)")
    return 0
