"""More sites than simulator threads, with each site's worker process kept between its turns.

With fewer threads than sites, FLARE 2.9's simulator gives a site one task per turn and ends the
site's worker process after it: every turn starts a process, imports torch and Lightning again,
rebuilds the client app and the site's engine and loads its data again, about 8 s here for a task
of a fraction of a second (benchmarks/site_turn.py measures it). WarmSiteRunner keeps a site's
worker waiting ("parked") after its task instead, and hands it the site's next turn: the worker
already waits for a go-on or stop message after every task (FLARE's own protocol between the
simulator and its worker), so a parked worker is one that has not been told yet. Only `threads`
workers run at a time, as before; the others wait, holding their memory. So that a run with many
sites still fits, the least recently used parked worker is told to stop when `keep` workers are
parked already, or when the machine's available memory falls under MIN_FREE_MEMORY; that site's
next turn starts a new worker, as FLARE's would.

It also drops FLARE's fixed 1 s pause before every turn (run_client_thread), which with a parked
worker would be most of a turn: a site with no task still waits FLARE's own retries (3 x 0.5 s)
in its worker before it gives its turn back, so nothing spins.

Tied to FLARE 2.9's simulator (SimulatorClientRunner and the simulator_worker command line):
warm_simulator refuses any other version, and `flctl simulate --cold-turns` runs FLARE's own.
"""

import copy
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from multiprocessing.connection import Client
from typing import NamedTuple

from nvflare.apis.fl_constant import ConfigVarName, RunnerTask, SystemConfigs, SystemVarName, WorkspaceConstants
from nvflare.apis.workspace import Workspace
from nvflare.fuel.utils import log_utils
from nvflare.fuel.utils.config_service import ConfigService
from nvflare.fuel.utils.network_utils import get_open_ports
from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner
from nvflare.private.fed.simulator.simulator_const import SimulatorConstants
from nvflare.utils.job_launcher_utils import add_custom_dir_to_path

from flctl.worker_zygote import ZygoteClient

WORKER_MODULE = "nvflare.private.fed.app.simulator.simulator_worker"
MIN_FREE_MEMORY = 0.15  # park no more workers once less than this share of memory is available
RELEASE_GRACE = 1.0  # seconds a told-to-stop worker gets to release the site's app (SWAP_OUT)
END_GRACE = 5.0  # then seconds between SIGTERM and SIGKILL


class Worker(NamedTuple):
    site: str
    process: subprocess.Popen
    conn: object  # multiprocessing.connection.Connection to the worker


def available_memory_share(meminfo="/proc/meminfo") -> float:
    """MemAvailable / MemTotal (1.0 where /proc/meminfo cannot be read)."""
    try:
        fields = dict(line.split(":", 1) for line in open(meminfo).read().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) / int(fields["MemTotal"].split()[0])
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return 1.0


class ParkedWorkers:
    """Workers told neither to go on nor to stop, least recently used first (thread-safe)."""

    def __init__(self, keep: int | None, memory_share=available_memory_share):
        self.keep, self.memory_share = keep, memory_share
        self._workers: OrderedDict[str, Worker] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, site: str) -> Worker | None:
        with self._lock:
            return self._workers.pop(site, None)

    def park(self, worker: Worker) -> list:
        """Park worker; returns the workers that must stop to make room (maybe worker itself)."""
        with self._lock:
            evicted = []
            while self._workers and (
                (self.keep is not None and len(self._workers) >= self.keep) or self.memory_share() < MIN_FREE_MEMORY
            ):
                evicted.append(self._workers.popitem(last=False)[1])
            if self.keep == 0 or (not self._workers and self.memory_share() < MIN_FREE_MEMORY):
                evicted.append(worker)
            else:
                self._workers[worker.site] = worker
            return evicted

    def drain(self) -> list:
        with self._lock:
            workers, self._workers = list(self._workers.values()), OrderedDict()
            return workers

    def __len__(self):
        return len(self._workers)


def stop_worker(worker: Worker, release: float = RELEASE_GRACE, end: float = END_GRACE) -> None:
    """Tell a worker to stop (it releases the site's app), then end its process, as FLARE ends a
    worker after every turn: a worker's own exit takes its process monitor's grace times (5 s)."""
    try:
        worker.conn.send(False)
    except (OSError, EOFError, ValueError):
        pass  # already gone
    try:
        worker.process.wait(timeout=release)
    except subprocess.TimeoutExpired:
        worker.process.terminate()
        try:
            worker.process.wait(timeout=end)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
    finally:
        worker.conn.close()


class WarmSiteRunner(SimulatorClientRunner):
    """FLARE's simulator client runner, with parked workers and no pause between turns."""

    def __init__(self, *args, keep: int | None = None, zygote: ZygoteClient | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.parked = ParkedWorkers(keep)
        self.started_workers = 0  # how many processes were started, for the log's last line
        self._stopping: list[threading.Thread] = []
        self.zygote = zygote  # workers fork from it; None: they start as new processes, as FLARE's

    def run(self, gpu):
        try:
            super().run(gpu)
        finally:
            for worker in self.parked.drain():
                self.stop_later(worker)
            for thread in self._stopping:
                thread.join()
            how = "forked from one that imported torch once" if self.zygote else "started as new processes"
            self.logger.info(f"warm sites: {self.started_workers} worker process(es) {how}")

    def stop_later(self, worker: Worker) -> None:
        """stop_worker off the turn's thread: the next site's turn does not wait for it."""
        thread = threading.Thread(target=stop_worker, args=(worker,), name=f"stop-{worker.site}", daemon=True)
        thread.start()
        self._stopping.append(thread)

    def run_client_thread(self, num_of_threads, gpu, lock, end_run_for_all, timeout=60):
        stop_run, client = False, None
        try:
            while not stop_run:
                if client is None:
                    with lock:
                        client = self.get_next_run_client(gpu)
                        client.simulate_running = True
                stop_run, client, end_run_client = self.do_one_task(client, num_of_threads, gpu, lock, timeout)
                if end_run_client:
                    with lock:
                        self.clients_finished_end_run.append(end_run_client)
            if end_run_for_all:
                self._end_run_clients(gpu, lock, num_of_threads, timeout)
        except Exception as e:
            self.logger.error(f"run_client_thread error: {e}")

    def do_one_task(self, client, num_of_threads, gpu, lock, timeout=60.0, task_name=RunnerTask.TASK_EXEC):
        """One turn of client; returns (stop_run, the client this thread runs next, end_run_client)."""
        if task_name != RunnerTask.TASK_EXEC:  # END_RUN for all: FLARE's own, in a fresh worker
            parked = self.parked.take(client.client_name)
            if parked:
                stop_worker(parked)
            return super().do_one_task(client, num_of_threads, gpu, lock, timeout, task_name)
        worker = self.parked.take(client.client_name)
        if worker is not None and worker.process.poll() is None:
            worker.conn.send(True)  # go on: the worker runs the site's next task in the same process
        else:
            worker = self.start_worker(client, gpu, timeout)
        try:
            stop_run = worker.conn.recv()
            end_run_client = worker.conn.recv() if stop_run else None
        except (EOFError, OSError) as e:
            self.logger.error(f"worker of {client.client_name} ended during its turn: {e}")
            stop_run, end_run_client = True, client.client_name
        if stop_run:
            self.stop_later(worker)
            with lock:
                client.simulate_running = False
            return True, None, end_run_client
        for evicted in self.parked.park(worker):
            self.stop_later(evicted)
        with lock:  # parked before it is free to pick: its next turn finds the worker
            client.simulate_running = False
            next_client = self.get_next_run_client(gpu)
            next_client.simulate_running = True
        return False, next_client, None

    def start_worker(self, client, gpu, timeout: float) -> Worker:
        """A new simulator_worker process for client, connected and sent its deployment."""
        port = get_open_ports(1)[0]
        site_ws = os.path.join(self.args.workspace, client.client_name)
        conf = self.logging_config  # as FLARE's: the workspace's, else nvflare's default; a mode wins
        if not os.path.isfile(conf):
            conf = os.path.join(os.path.dirname(log_utils.__file__), WorkspaceConstants.LOGGING_CONFIG)
        conf = self.args.log_config or conf
        decomposers = ConfigService.get_str_var(name=ConfigVarName.DECOMPOSER_MODULE, conf=SystemConfigs.RESOURCES_CONF)
        argv = [sys.executable, "-m", WORKER_MODULE, "-o", site_ws, "--logging_config", conf,
                "--client", client.client_name, "--token", client.token, "--port", str(port),
                "--parent_pid", str(os.getpid()), "--simulator_root", self.simulator_root,
                "--root_url", str(client.cell.get_root_url_for_child()),
                "--parent_url", str(client.cell.get_internal_listener_url()),
                "--task_name", RunnerTask.TASK_EXEC, "--decomposer_module", str(decomposers)]  # fmt: skip
        if gpu:
            argv += ["--gpu", str(gpu)]
        env = os.environ.copy()
        custom = Workspace(root_dir=site_ws, site_name=client.client_name).get_app_custom_dir(
            SimulatorConstants.JOB_NAME
        )
        add_custom_dir_to_path(custom, env)
        paths = env.get(SystemVarName.PYTHONPATH, "").split(os.pathsep)  # the server's code is not the site's
        env[SystemVarName.PYTHONPATH] = os.pathsep.join(p for p in paths if p != self.server_custom_folder)
        self.logger.debug(f"starting {shlex.join(argv)}")
        process = self.fork_worker(argv, env) or subprocess.Popen(argv, env=env, start_new_session=True)
        self.started_workers += 1
        conn = self.connect(port, process, timeout)
        self.build_ctx["client_name"] = client.client_name
        deploy_args = copy.deepcopy(self.deploy_args)
        deploy_args.workspace = os.path.join(deploy_args.workspace, client.client_name)
        conn.send({SimulatorConstants.CLIENT_CONFIG: self.client_config, SimulatorConstants.DEPLOY_ARGS: deploy_args,
                   SimulatorConstants.BUILD_CTX: self.build_ctx})  # fmt: skip
        return Worker(client.client_name, process, conn)

    def fork_worker(self, argv: list, env: dict):
        """The worker forked from the zygote; None without one, or when it failed to start (then
        workers start as new processes, as FLARE starts them, and the log says why once)."""
        if self.zygote is None:
            return None
        try:
            return self.zygote.spawn(argv, env, os.getcwd())
        except (RuntimeError, OSError, EOFError) as e:
            self.logger.warning(f"{e}: site workers start as new processes")
            self.zygote = None
            return None

    @staticmethod
    def connect(port: int, process, timeout: float, poll: float = 0.05):
        """The worker's listener, tried every `poll` s (it listens within a second or two)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return Client(("localhost", port))
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the simulator worker exited ({process.returncode}) before it listened"
                    ) from None
                if time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(
                        f"the simulator worker did not listen on port {port} within {timeout} s"
                    ) from None
                time.sleep(poll)
