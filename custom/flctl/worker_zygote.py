"""Site workers forked from one process that imported torch and Lightning once (a "zygote").

A simulator worker spends most of its start importing torch, torchvision, torchmetrics and
Lightning (about 7 s of CPU here; benchmarks/site_turn.py). Sixteen sites pay that sixteen
times, on a machine with two cores. The zygote imports them once, then forks a process per
worker start: the child sets the worker's environment, folder and arguments and runs FLARE's
simulator_worker module as `python -m` would, with those modules already in memory (shared
copy-on-write with the zygote). Nothing in the zygote runs torch code, so no thread pool exists
to be lost in the fork (as with a DataLoader's forked workers). The site's own code (the job's
app/custom) is never imported in the zygote: each child imports it from its own folder.

    python -m flctl.worker_zygote SOCKET [MODULE ...]     (started by ZygoteClient; default PRELOAD)

The requests, over a Unix socket: ("spawn", argv, env, cwd) -> pid; ("status", pid) -> None
while it runs, else its exit code as Popen gives it (-N: killed by signal N); ("exit",).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener

WORKER_MODULE = "nvflare.private.fed.app.simulator.simulator_worker"
PRELOAD = ("torch", "torchvision", "torchmetrics", "pytorch_lightning", WORKER_MODULE)


def preload(modules) -> list:
    """Import modules (those installed); each is dropped again from sys.modules, its own imports
    kept, so that runpy runs a worker module afresh as __main__ with its imports already done."""
    import importlib

    done = []
    for name in modules:
        try:
            importlib.import_module(name)
            done.append(name)
        except ImportError:
            pass
    sys.modules.pop(WORKER_MODULE, None)
    return done


def run_child(argv: list, env: dict, cwd: str, base_path: list) -> None:
    """In the forked child: become `python -m MODULE ARGS` in env and cwd, then exit."""
    code = 1
    try:
        os.setsid()
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [cwd] + extra + [p for p in base_path if p not in extra]  # as a new interpreter's
        module, args = argv[argv.index("-m") + 1], argv[argv.index("-m") + 2 :]
        sys.argv = [module] + args
        import runpy

        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def serve(socket_path: str, modules=PRELOAD) -> None:
    base_path = [p for p in sys.path[1:] if p not in os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    preload(modules)
    exits = {}

    def reap():  # every child's exit, collected as it comes, so none is left a zombie
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            exits[pid] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    # One thread only: a fork copies the calling thread alone, so no other may hold a lock then.
    with Listener(socket_path, family="AF_UNIX") as listener, listener.accept() as conn:
        while True:
            reap()
            try:
                if not conn.poll(0.1):
                    continue
                request = conn.recv()
            except (EOFError, OSError):
                return  # the simulator is gone
            if request[0] == "spawn":
                pid = os.fork()
                if pid == 0:
                    listener.close(), conn.close()
                    run_child(*request[1:], base_path)
                conn.send(pid)
            elif request[0] == "status":
                reap()
                conn.send(exits.get(request[1]))
            else:
                return


class ForkedProcess:
    """What the runner needs of a Popen, for a worker the zygote forked."""

    def __init__(self, pid: int, zygote: "ZygoteClient"):
        self.pid, self.zygote, self.returncode = pid, zygote, None

    def poll(self):
        if self.returncode is None:
            self.returncode = self.zygote.ask(("status", self.pid))
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


class ZygoteClient:
    """Starts the zygote and asks it for workers; one request at a time (thread-safe)."""

    def __init__(self, env: dict, timeout: float = 300.0, modules=PRELOAD):
        """Starts the zygote; the first request waits until it has imported and listens."""
        self.folder = tempfile.mkdtemp(prefix="flctl-zygote-")  # short: a socket path has 107 bytes at most
        self.socket_path = os.path.join(self.folder, "socket")
        argv = [sys.executable, "-m", "flctl.worker_zygote", self.socket_path, *modules]
        self.process = subprocess.Popen(argv, env=env, start_new_session=True)
        self.timeout, self.conn, self._lock = timeout, None, threading.Lock()

    def _connect(self) -> None:
        deadline = time.monotonic() + self.timeout
        while self.conn is None:
            try:
                self.conn = Client(self.socket_path, family="AF_UNIX")
            except (FileNotFoundError, ConnectionRefusedError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the site workers' zygote did not start (exit {self.process.poll()})") from None
                time.sleep(0.05)

    def ask(self, request):
        with self._lock:
            self._connect()
            self.conn.send(request)
            return self.conn.recv()

    def spawn(self, argv: list, env: dict, cwd: str) -> ForkedProcess:
        return ForkedProcess(self.ask(("spawn", argv, env, cwd)), self)

    def close(self) -> None:
        try:
            if self.conn is not None:
                self.conn.send(("exit",))
                self.conn.close()
            else:
                self.process.terminate()
            self.process.wait(timeout=10)
        except (OSError, EOFError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2:])
