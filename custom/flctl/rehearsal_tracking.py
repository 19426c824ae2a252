"""The rehearsal's tracking host: PostgreSQL and an MLflow server with basic auth (flctl rehearse, step 2).

A part of flctl.rehearsal.Rehearsal: it uses the rehearsal's network, launch, in_ns, base_env,
folders (tracking, logs, credentials), procs and say.
"""

import sys

from flctl.local_postgres import LocalPostgres
from flctl.mlflow_server import MlflowServer, read_env_file
from flctl.rehearsal_hosts import LINK_TRACKING, PG_PORT, TRACKING_HOST, TRACKING_PORT


class TrackingHost:
    """Starts PostgreSQL (flctl.local_postgres) and `mlflow server` on it, in the tracking namespace."""

    def tracking_credentials(self) -> dict:
        """The MLFLOW_TRACKING_* lines the tracking server's first start wrote: the FL server's alone."""
        return read_env_file(self.credentials)

    def start_tracking(self):
        prefix = self.network.exec_prefix("tracking")
        pg = LocalPostgres(self.tracking, PG_PORT, prefix=prefix, log=self.logs / "postgres.log", env=self.base_env())
        try:
            pg.start()
        finally:
            self.procs["postgres"] = pg.proc  # down() ends it with the rest
        self.mlflow = MlflowServer(
            self.tracking / "mlflow",
            TRACKING_PORT,
            auth=True,
            say=self.say,
            store=pg.store_uri,
            host=LINK_TRACKING,
            prefix=prefix,
            env=pg.client_env,
            healthy=self.tracking_healthy,
            # MLflow answers 403 to a Host header it does not know (DNS-rebinding protection):
            # the name the FL server uses must be allowed.
            args=[
                "--allowed-hosts",
                f"{TRACKING_HOST},{TRACKING_HOST}:{TRACKING_PORT},{LINK_TRACKING}:{TRACKING_PORT}",
            ],
        )
        self.mlflow.start(timeout=180)
        self.procs["mlflow"] = self.mlflow.proc

    def tracking_healthy(self, uri) -> bool:
        """/health, asked from the FL server's namespace: the only one with a route to it."""
        code = f"import urllib.request as u; u.urlopen('{uri}/health', timeout=2)"
        return self.in_ns("server", [sys.executable, "-c", code]).returncode == 0
