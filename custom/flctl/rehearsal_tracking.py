"""The rehearsal's tracking host: PostgreSQL and an MLflow server with basic auth (flctl rehearse, step 2).

A part of flctl.rehearsal.Rehearsal: it uses the rehearsal's network, launch, in_ns, base_env,
folders (tracking, logs, credentials), procs and say.
"""

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flctl.errors import CliError
from flctl.mlflow_server import MlflowServer, read_env_file, write_secret
from flctl.rehearsal_hosts import LINK_TRACKING, PG_PORT, TRACKING_HOST, TRACKING_PORT

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def pg_bin() -> Path | None:
    found = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")))
    return next((p for p in reversed(found) if (p / "initdb").is_file()), None)


class TrackingHost:
    """Starts PostgreSQL as the postgres user and `mlflow server` on it, in the tracking namespace."""

    def as_postgres(self, host=None) -> list:
        # setpriv execs (no fork, unlike runuser): the PID we keep is PostgreSQL's own.
        drop = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
        return [*(self.network.exec_prefix(host) if host else []), *drop]

    def tracking_credentials(self) -> dict:
        """The MLFLOW_TRACKING_* lines the tracking server's first start wrote: the FL server's alone."""
        return read_env_file(self.credentials)

    def start_tracking(self):
        pg = pg_bin()
        data, sock = self.tracking / "pgdata", self.tracking / "pgsock"
        for folder in (self.tracking, data, sock):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(data, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
        os.chmod(data, 0o700)
        os.chmod(sock, 0o700)  # the socket: for root and postgres only
        if not (data / "PG_VERSION").exists():
            # Local socket trusted (folder mode 700); TCP, even on 127.0.0.1, by password.
            init = subprocess.run(
                [*self.as_postgres(), pg / "initdb", "-D", data, "-U", "postgres", "-E", "UTF8"]
                + ["--auth-local=trust", "--auth-host=scram-sha-256"],
                capture_output=True,
                text=True,
            )
            if init.returncode != 0:
                raise CliError(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
        pg_cmd = [pg / "postgres", "-D", data, "-k", sock, "-p", str(PG_PORT), "-c", "listen_addresses=127.0.0.1"]
        self.launch("postgres", "tracking", [*self.as_postgres(), *pg_cmd], self.base_env())
        deadline = time.monotonic() + 60
        while self.as_ready(pg, sock) != 0:
            if time.monotonic() > deadline or self.procs["postgres"].poll() is not None:
                raise CliError(f"PostgreSQL did not start; see {self.logs / 'postgres.log'}")
            time.sleep(0.5)
        pgpass = self.tracking / "pgpass"
        if not pgpass.exists():
            password = secrets.token_urlsafe(24)
            # The password travels on psql's stdin, never a command line.
            sql = f"CREATE ROLE mlflow LOGIN PASSWORD '{password}';\nCREATE DATABASE mlflow OWNER mlflow;\n"
            done = subprocess.run(
                [*self.as_postgres("tracking"), pg / "psql", "-h", sock, "-p", str(PG_PORT), "-U", "postgres"]
                + ["-v", "ON_ERROR_STOP=1", "-q", "-f", "-"],
                input=sql,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise CliError(f"could not create MLflow's database: {done.stderr.strip()}")
            write_secret(pgpass, f"127.0.0.1:{PG_PORT}:mlflow:mlflow:{password}\n")
        self.mlflow = MlflowServer(
            self.tracking / "mlflow",
            TRACKING_PORT,
            auth=True,
            say=self.say,
            store=f"postgresql+psycopg2://mlflow@127.0.0.1:{PG_PORT}/mlflow",
            host=LINK_TRACKING,
            prefix=self.network.exec_prefix("tracking"),
            env={"PGPASSFILE": str(pgpass)},
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

    def as_ready(self, pg, sock) -> int:
        return subprocess.run(
            [*self.as_postgres("tracking"), pg / "pg_isready", "-q", "-h", sock, "-p", str(PG_PORT)],
            capture_output=True,
        ).returncode

    def tracking_healthy(self, uri) -> bool:
        """/health, asked from the FL server's namespace: the only one with a route to it."""
        code = f"import urllib.request as u; u.urlopen('{uri}/health', timeout=2)"
        return self.in_ns("server", [sys.executable, "-c", code]).returncode == 0
