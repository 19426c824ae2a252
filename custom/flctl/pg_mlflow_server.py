"""An `mlflow server` on PostgreSQL, both on 127.0.0.1, for the benchmarks and the tests.

The store users deploy (the rehearsal's, without its network namespaces and basic auth):
PostgreSQL from flctl.local_postgres, MLflow's server from flctl.mlflow_server with `workers`
processes. Everything it starts is ended by PID on the way out, also after a failure, and its
folder (data, logs, artifacts) is removed unless keep=True.

    with pg_mlflow_server(workers=4) as stack:
        MlflowClient(stack.uri).log_batch(...)
        stack.cpu_seconds()  # what the server and PostgreSQL used so far: who did the work
"""

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from flctl.local_postgres import LocalPostgres
from flctl.mlflow_server import MlflowServer


class Stack:
    """The running pair: the server's URI, and the CPU its processes used."""

    def __init__(self, server: MlflowServer, postgres: LocalPostgres):
        self.server, self.postgres, self.uri = server, postgres, server.uri

    def cpu_seconds(self) -> dict:
        """{"mlflow": s, "postgres": s}: user + system CPU of each one's process tree (live
        processes: a worker that ended takes its share along)."""
        parents, cpu = {}, {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(stat.parent.name)
            parents[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out = {}
        for name, root in (("mlflow", self.server.proc), ("postgres", self.postgres.proc)):
            out[name] = sum(c for pid, c in cpu.items() if root is not None and descends(pid, root.pid, parents))
        return out


def descends(pid: int, root: int, parents: dict) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = parents.get(pid, 0)
    return False


@contextlib.contextmanager
def pg_mlflow_server(folder=None, workers: int = 4, keep: bool = False, bin_dir=None, timeout: float = 180):
    """Yields a Stack (its uri: http://127.0.0.1:PORT). folder: where PostgreSQL's data and the
    server's files go (default: a new folder under /tmp, which the postgres user can enter)."""
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="pg-mlflow-"))
        folder.chmod(0o755)  # mkdtemp's 700 would keep the postgres user out
    folder = Path(folder)
    pg = LocalPostgres(folder / "postgres", bin_dir=bin_dir)
    server = None
    # A benchmark ended with SIGTERM (kill, a CI timeout) would skip the cleanup below and leave
    # PostgreSQL running: while this runs, SIGTERM ends the process through SystemExit instead.
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm) if in_main_thread() else None
    try:
        pg.start()
        server = MlflowServer(folder / "mlflow", store=pg.store_uri, env=pg.client_env, workers=workers)
        server.start(timeout=timeout)
        yield Stack(server, pg)
    finally:
        if server is not None:
            server.stop()  # before PostgreSQL: its pooled connections would hold a shutdown
        pg.stop()
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
