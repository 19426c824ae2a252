"""PostgreSQL for an MLflow server: a cluster of its own in a folder, run as the postgres user.

The one way this project starts PostgreSQL. The deployment rehearsal (flctl.rehearsal_tracking)
runs it inside its tracking host's network namespace (prefix: `ip netns exec tracking`); the
benchmarks and the tests run it on 127.0.0.1 with no prefix (flctl.pg_mlflow_server).

PostgreSQL refuses to run as root, so every command of it runs as the postgres user through
setpriv, which execs (no fork, unlike runuser): the PID kept is PostgreSQL's own. The local
socket is trusted (its folder has mode 700); TCP, even on 127.0.0.1, needs the password, which
is made on the first start and lives only in FOLDER/pgpass (mode 600) and on psql's stdin,
never on a command line.
"""

import os
import secrets
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

from flctl.errors import CliError
from flctl.mlflow_server import free_port, write_secret

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = "apt-get install -y postgresql; scripts/setup.sh --postgres does it"


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian's layout), or None."""
    found = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")))
    return next((p for p in reversed(found) if (p / "initdb").is_file()), None)


def cannot_run(bin_dir=None) -> str | None:
    """None when PostgreSQL can be started here as the postgres user, else the one-line reason."""
    if bin_dir is None and pg_bin() is None:
        return f"PostgreSQL is not installed ({INSTALL_HINT})"
    if bin_dir is not None and not (Path(bin_dir) / "initdb").is_file():
        return f"PostgreSQL is not installed: no initdb in {bin_dir} ({INSTALL_HINT})"
    if os.geteuid() != 0:
        return "needs root to start PostgreSQL as the postgres user (it refuses to run as root itself)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing: it starts PostgreSQL as the postgres user"
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' user (Debian's postgresql package creates it)"
    try:
        import psycopg2  # noqa: F401 - MLflow's PostgreSQL driver
    except ImportError:
        return "psycopg2 is missing (pip install -r requirements.txt)"
    return None


def unreachable_parent(folder: Path) -> Path | None:
    """The first folder above folder that others may not enter (the postgres user could not reach
    its data there), or None."""
    for parent in Path(folder).resolve().parents:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


class LocalPostgres:
    def __init__(self, folder, port: int | None = None, prefix=(), log=None, env=None, bin_dir=None):
        """folder: pgdata/, pgsock/ and pgpass go there; port: TCP on 127.0.0.1 (default: a free
        one); prefix: what every PostgreSQL command runs under (a network namespace's exec);
        log: PostgreSQL's output (default FOLDER/postgres.log); env: its environment."""
        self.folder = Path(folder).resolve()
        self.data, self.sock, self.pgpass = self.folder / "pgdata", self.folder / "pgsock", self.folder / "pgpass"
        self.port = port or free_port()
        self.prefix = list(prefix)
        self.log = Path(log) if log else self.folder / "postgres.log"
        self.env = dict(env) if env is not None else None
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.proc = None  # the postmaster's Popen once started

    # MLflow's view of it: the database and the password file its driver reads.
    store_uri = property(lambda self: f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/mlflow")
    client_env = property(lambda self: {"PGPASSFILE": str(self.pgpass)})

    def as_postgres(self) -> list:
        return [*self.prefix, "setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]

    def start(self, timeout: float = 60) -> "LocalPostgres":
        """initdb on the first start, then the server; returns once it takes connections and the
        mlflow role and database exist."""
        why = cannot_run(self.bin_dir)
        if why is None and (parent := unreachable_parent(self.folder)) is not None:
            mode = parent.stat().st_mode & 0o777
            why = f"the postgres user cannot enter {parent} (mode {mode:o}); use a folder under /tmp"
        if why:
            raise CliError(why)
        pg = self.bin_dir or pg_bin()
        for folder in (self.folder, self.data, self.sock):
            folder.mkdir(parents=True, exist_ok=True)
        for folder in (self.data, self.sock):
            shutil.chown(folder, "postgres", "postgres")
            os.chmod(folder, 0o700)  # the data and the socket: for root and postgres only
        if not (self.data / "PG_VERSION").exists():
            init = self._run([pg / "initdb", "-D", self.data, "-U", "postgres", "-E", "UTF8"]
                             + ["--auth-local=trust", "--auth-host=scram-sha-256"])  # fmt: skip
            if init.returncode != 0:
                raise CliError(f"initdb failed: {(init.stderr.strip().splitlines() or ['?'])[-1]}")
        cmd = [pg / "postgres", "-D", self.data, "-k", self.sock, "-p", str(self.port)]
        cmd += ["-c", "listen_addresses=127.0.0.1"]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [*self.as_postgres(), *map(str, cmd)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,  # Ctrl-C in the terminal reaches us only; stop() ends it
            )
        deadline = time.monotonic() + timeout
        while self._run([pg / "pg_isready", "-q", "-h", self.sock, "-p", str(self.port)]).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise CliError(f"PostgreSQL did not start; see {self.log}")
            time.sleep(0.3)
        if not self.pgpass.exists():
            self._create_database(pg)
        return self

    def _create_database(self, pg: Path) -> None:
        password = secrets.token_urlsafe(24)
        sql = f"CREATE ROLE mlflow LOGIN PASSWORD '{password}';\nCREATE DATABASE mlflow OWNER mlflow;\n"
        done = self._run(
            [pg / "psql", "-h", self.sock, "-p", str(self.port), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]
            + ["-f", "-"],
            input=sql,  # the password travels on stdin
        )
        if done.returncode != 0:
            raise CliError(f"could not create MLflow's database: {done.stderr.strip()}")
        write_secret(self.pgpass, f"127.0.0.1:{self.port}:mlflow:mlflow:{password}\n")

    def _run(self, argv, input=None) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_postgres(), *map(str, argv)], input=input, capture_output=True, text=True)

    def stop(self, remove: bool = False) -> None:
        """Ends the server it started (fast shutdown: SIGINT, then SIGKILL to its group); with
        remove, its folder goes too."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # SIGTERM would wait for every client to leave
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its backends, should the postmaster have died first
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
