"""An `mlflow server` on PostgreSQL, both on 127.0.0.1, for the benchmarks and the tests.

The store users deploy (the rehearsal's, without its network namespaces and basic auth):
PostgreSQL from flctl.local_postgres, MLflow's server from flctl.mlflow_server with `workers`
processes. Everything it starts is ended by PID on the way out, also after a failure, and its
folder (data, logs, artifacts) is removed unless keep=True.

    with pg_mlflow_server(tmp, workers=4) as uri:
        MlflowClient(uri).log_batch(...)
"""

import contextlib
import shutil
import tempfile
from pathlib import Path

from flctl.local_postgres import LocalPostgres
from flctl.mlflow_server import MlflowServer


@contextlib.contextmanager
def pg_mlflow_server(folder=None, workers: int = 4, keep: bool = False, bin_dir=None, timeout: float = 180):
    """Yields the server's URI (http://127.0.0.1:PORT). folder: where PostgreSQL's data and the
    server's files go (default: a new folder under /tmp, which the postgres user can enter)."""
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="pg-mlflow-"))
        folder.chmod(0o755)  # mkdtemp's 700 would keep the postgres user out
    folder = Path(folder)
    pg = LocalPostgres(folder / "postgres", bin_dir=bin_dir)
    server = None
    try:
        pg.start()
        server = MlflowServer(folder / "mlflow", store=pg.store_uri, env=pg.client_env, workers=workers)
        server.start(timeout=timeout)
        yield server.uri
    finally:
        if server is not None:
            server.stop()  # before PostgreSQL: its pooled connections would hold a shutdown
        pg.stop()
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
