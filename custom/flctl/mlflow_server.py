"""The one launcher of a local `mlflow server` (SQLite store, artifact folder, 127.0.0.1).

    flctl mlflow-server [--dir DIR] [--port PORT] [--no-auth] start|stop|status

With auth (the default for the command line), MLflow's basic-auth app: on the first start a
random admin password and a Flask secret key are written to DIR/credentials, DIR/auth.ini and
DIR/server.env, readable by their owner only (mode 600); they reach the server through its
environment and files, never its command line. DIR/server.pid names the server's process
(the leader of its own process group, so stop ends its workers too). A PID file naming a dead
process, or a live one that is not this folder's server (a PID reused after a crash), is stale:
it is removed and that process is never signalled. Tests use MlflowServer directly: start(),
stop(), kill() (SIGKILL, as in a crash), start() again on the same folder and port.
"""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flctl import processes
from flctl.errors import CliError, port_number

CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# MLflow's basic auth hashes the password at every request (tens of ms of the server's CPU each,
# by design): without this cache a tracking server under the FL server's write stream spends
# most of its CPU there. A successful check is kept 60 s per worker (HMAC-keyed, in memory);
# a password changed through MLflow's API takes effect at once on the worker that changed it.
AUTH_CACHE_LINE = "auth_cache_ttl_seconds = 60"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def write_secret(path: Path, text: str) -> None:
    """Created with mode 600 from the start: no moment where others can read it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def read_env_file(path) -> dict:
    """KEY=VALUE lines (the last may lack a newline); blank lines and # comments skipped."""
    out = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.lstrip().startswith("#"):
            out[key.strip()] = value
    return out


class MlflowServer:
    def __init__(
        self,
        folder,
        port: int | None = None,
        auth: bool = False,
        say=lambda msg: None,
        store=None,
        host="127.0.0.1",
        prefix=(),
        env=None,
        healthy=healthy,
        args=(),
        workers: int = 1,
    ):
        """The defaults: SQLite in folder, 127.0.0.1. The deployment rehearsal passes another
        store (PostgreSQL), the address to listen on, a command prefix (`ip netns exec NS`),
        extra environment for the server, a health check that runs where the server is
        reachable from, and more `mlflow server` options (args). workers: the server's worker
        processes (a database server serves several requests at once; SQLite one writer)."""
        self.folder = Path(folder).resolve()
        self.port = port or free_port()
        self.uri = f"http://{host}:{self.port}"
        self.auth = auth
        self.say = say
        self.host, self.prefix, self.extra_env, self.healthy = host, list(prefix), dict(env or {}), healthy
        self.args, self.workers = list(args), workers
        self.proc = None  # the Popen, when this process started the server
        self.pid_file = self.folder / "server.pid"
        self.credentials = self.folder / "credentials"
        self.store = store or f"sqlite:///{self.folder / 'mlflow.db'}"

    # ----- which process is ours ----------------------------------------------------------
    def running_pid(self) -> int | None:
        """The PID in the PID file if that process is alive and is this folder's server."""
        pid = processes.read_pid(self.pid_file)
        if pid and processes.alive(pid) and self.store in processes.cmdline(pid):
            return pid
        return None

    def drop_stale_pid_file(self) -> None:
        if self.pid_file.exists() and self.running_pid() is None:
            named = self.pid_file.read_text()[:20].strip()
            self.say(f"mlflow-server: removing stale PID file {self.pid_file} (PID {named} is not this server)")
            self.pid_file.unlink()

    # ----- secrets ------------------------------------------------------------------------------
    def ensure_secrets(self) -> dict:
        """The server's environment additions; creates the secrets on the first start."""
        if not self.credentials.exists():
            password = secrets.token_urlsafe(24)
            write_secret(self.credentials, f"MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD={password}\n")
            write_secret(
                self.folder / "auth.ini",
                f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.folder / 'auth.db'}\n"
                f"admin_username = admin\nadmin_password = {password}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                f"{AUTH_CACHE_LINE}\n",
            )
            write_secret(self.folder / "server.env", f"MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(32)}\n")
            self.say(f"mlflow-server: created an admin password in {self.credentials} (mode 600)")
        for name in ("credentials", "auth.ini", "server.env"):
            os.chmod(self.folder / name, 0o600)
        self.ensure_auth_cache()
        return {**read_env_file(self.folder / "server.env"), "MLFLOW_AUTH_CONFIG_PATH": str(self.folder / "auth.ini")}

    def ensure_auth_cache(self) -> None:
        """A folder made before the auth cache was set gets it (once, said): without it every
        request pays a full password hash on the server, most of its CPU under our tracker."""
        ini = self.folder / "auth.ini"
        text = ini.read_text()
        if "auth_cache_ttl_seconds" in text:
            return
        write_secret(ini, text.rstrip("\n") + f"\n{AUTH_CACHE_LINE}\n")
        self.say(f"mlflow-server: added '{AUTH_CACHE_LINE}' to {ini}")

    # ----- start / stop ------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> "MlflowServer":
        """Starts the server unless it runs already; returns once /health answers."""
        pid = self.running_pid()
        if pid:
            self.say(f"mlflow-server: already running (PID {pid}) at {self.uri}")
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self.drop_stale_pid_file()
        (self.folder / "artifacts").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}
        env.update(self.extra_env)
        # Tracking only: MLflow 3's server-side job runner (GenAI jobs; 8 more processes, each
        # importing MLflow, about 25 s of CPU at every start on 2 cores) stays off unless asked for.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        cmd = [*self.prefix, str(Path(sys.executable).parent / "mlflow"), "server"]
        if self.auth:
            env.update(self.ensure_secrets())
            cmd += ["--app-name", "basic-auth"]
        if self.healthy(self.uri):
            raise CliError(f"something else already answers on {self.uri}")
        cmd += ["--backend-store-uri", self.store, "--artifacts-destination", str(self.folder / "artifacts")]
        cmd += ["--host", self.host, "--port", str(self.port), "--workers", str(self.workers), *self.args]
        log_path = self.folder / "server.log"
        with open(log_path, "a") as log:  # the child keeps its own copy of the descriptor
            # Own process group and session: stop() ends the server and every worker it spawned.
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        self.pid_file.write_text(f"{self.proc.pid}\n")
        (self.folder / "uri").write_text(f"{self.uri}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise CliError(f"the server exited with {self.proc.returncode}; see {log_path}")
            if self.healthy(self.uri):
                where = f"; credentials in {self.credentials}" if self.auth else ""
                self.say(f"mlflow-server: running (PID {self.proc.pid}) at {self.uri}{where}")
                return self
            time.sleep(0.3)
        self.stop()
        raise CliError(f"the server did not answer on {self.uri} within {timeout:.0f} s; see {log_path}")

    def _signal_group(self, pid: int, sig) -> None:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self, pid: int, timeout: float) -> bool:
        if self.proc is not None and self.proc.pid == pid:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        return not processes.wait_gone([pid], timeout)

    def stop(self) -> bool:
        """Ends this folder's server and its workers; False when none was running."""
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            self.proc = None
            return False
        self._signal_group(pid, signal.SIGTERM)
        if not self._reap(pid, 15):
            self._signal_group(pid, signal.SIGKILL)
            self._reap(pid, 10)
        self._signal_group(pid, signal.SIGKILL)  # a worker that outlived its leader
        self.pid_file.unlink(missing_ok=True)
        self.proc = None
        return True

    def kill(self) -> None:
        """As in a crash: SIGKILL to the server and its workers, no shutdown, PID file left behind."""
        pid = self.running_pid()
        if pid is not None:
            self._signal_group(pid, signal.SIGKILL)
            self._reap(pid, 10)
        self.proc = None


# ----- command line -------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mlflow-server", help="a local MLflow tracking server with basic auth", description=__doc__
    )
    p.add_argument("command", choices=("start", "stop", "status"))
    p.add_argument("--dir", default="/tmp/nvflare/mlflow-server", help="server folder (default %(default)s)")
    p.add_argument("--port", type=port_number, default=5000, help="port on 127.0.0.1 (default %(default)s)")
    p.add_argument("--no-auth", action="store_true", help="without MLflow's basic-auth app")
    p.set_defaults(func=run)


def run(args) -> int:
    server = MlflowServer(args.dir, args.port, auth=not args.no_auth, say=print)
    if args.command == "start":
        server.start()
        if server.proc is not None:
            server.proc = None  # it outlives this command; stop finds it by its PID file
    elif args.command == "stop":
        print("mlflow-server: stopped" if server.stop() else "mlflow-server: not running")
    else:
        pid = server.running_pid()
        if pid is None:
            print("mlflow-server: not running")
            return 3
        uri = (server.folder / "uri").read_text().strip() if (server.folder / "uri").exists() else server.uri
        print(f"mlflow-server: running (PID {pid}) at {uri}")
    return 0
