"""Run a job in FLARE's POC mode: real server and site processes on this machine.

    flctl poc [options] prepare|start|submit|wait|download|stop|clean|status|run

  prepare   create the POC workspace for --sites sites (replaces an earlier one)
  start     start the FL server, then the sites; only the server gets MLflow credentials.
            Says so and does nothing when all are running; after a crash, stops what is left
            and clears stale PID files first, recovers the tracking of jobs the dead server
            left unfinished (flctl recover; --no-recover skips it) and marks those jobs
            FINISHED:ABORTED in FLARE's job store (FLARE 2.9 cannot resume them: `resume` continues one)
  submit    configure a copy of the job, check it (flctl check), submit it; prints the job id
  wait      wait for the submitted job (--timeout) and fail unless FLARE says it finished OK;
            if the FL server goes away meanwhile, say so, stop the sites and fail
  download  download the job's result (MLflow data, models, logs) into WORKSPACE/results and
            judge it from the tracker's stats file
  stop      stop the server and sites; ends by PID any of their processes still alive after that
  clean     stop, then delete the POC workspace
  status    list the POC processes that are running
  run       prepare, start, submit, wait, download, stop (stops on failure too)
  resume    after an FL server crash and `start`: the last job (or --job-id) goes on from its
            last global model into its own MLflow runs (flctl resume), then waits as `wait`

--site-policy SITE=FILE (with prepare or run) checks a site's disclosure policy and places it in
that site's own folder, .../prod_00/SITE/local/disclosure_policy.json (docs/site-policy.md).

nvflare's CLI config, which nvflare writes to $HOME/.nvflare/config.conf, goes to
WORKSPACE/home/.nvflare: HOME points there for every nvflare command, so ~/.nvflare is never
touched. Credentials (--credentials FILE with MLFLOW_TRACKING_USERNAME=... and
MLFLOW_TRACKING_PASSWORD=... lines) reach the FL server's environment only, never a command
line; the sites start without any MLFLOW_TRACKING_* variable. Processes are found by a /proc
scan for the POC workspace's path, and ended by PID.
"""

import os
import shutil
import sys
import time
from pathlib import Path

from fl_lightning_mlflow.server.tracking_uri import USERINFO, redact_uri
from fl_lightning_mlflow.site.disclosure_policy import POLICY_FILE
from flctl import nvflare_cli, processes
from flctl.check_job import check_or_fail, split_sites
from flctl.configure import JobConfigError, configure_job
from flctl.errors import DEFAULT_JOB, CliError, default_data_root, resolve_job
from flctl.job_store import ABORTED, end_zombie_jobs
from flctl.mlflow_server import CREDENTIAL_VARS, read_env_file
from flctl.outcome import MODEL_FILE, read_stats
from flctl.policy import place as place_policies
from flctl.recover import recover_tracking
from flctl.simulate import ensure_data, job_settings, uses_cifar_data

COMMANDS = ("prepare", "start", "submit", "wait", "download", "stop", "clean", "status", "run", "resume")
CONTROL_FILES = ("daemon_pid.fl", "pid.fl", "shutdown.fl", "restart.fl")
WAIT_EXIT_TIMEOUT = 3  # `nvflare job wait`'s exit status when --timeout passed


def refuse_userinfo(uri) -> None:
    """A user:password@ in the tracking URI would travel in the job's server config, and FLARE
    deploys a job's app folder (server config included) to every site: refused before submission."""
    if uri and USERINFO.search(uri):
        raise CliError(
            f"tracking URI {redact_uri(uri)} carries user:password@; nothing was submitted. The job's config "
            "reaches every site: put MLFLOW_TRACKING_USERNAME= and MLFLOW_TRACKING_PASSWORD= lines in a "
            "credentials file (mode 600) given with --credentials, which only the FL server's environment gets"
        )


def say(msg, err=False):
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


class Poc:
    # Prepended to every nvflare command (the deployment rehearsal: `ip netns exec` the admin's host).
    command_prefix = ()

    def __init__(
        self,
        workspace="/tmp/nvflare/poc-hello",
        sites=2,
        job=DEFAULT_JOB,
        rounds=2,
        epochs=1,
        offline=False,
        data_root=None,
        tracking_uri=None,
        credentials=None,
        timeout=1800,
        job_id=None,
        say=say,
        recover=True,
        experiment=None,
        site_policies=None,
    ):
        self.workspace = Path(workspace).expanduser().resolve()
        self.sites, self.job_src, self.rounds, self.epochs = sites, resolve_job(job), rounds, epochs
        self.offline, self.data_root = offline, default_data_root(data_root, offline)
        # A job that is not the CIFAR-10 example's keeps its own data_root unless one is given.
        self.given_data_root = Path(data_root).expanduser().resolve() if data_root else None
        self.tracking_uri, self.credentials, self.timeout, self.job_id = tracking_uri, credentials, timeout, job_id
        self.say, self.recover, self.experiment = say, recover, experiment
        self.site_policies = dict(site_policies or {})  # site -> disclosure policy file, placed by prepare
        self.poc_ws = self.workspace / "poc"
        self.prod = self.poc_ws / "example_project" / "prod_00"
        self.kit = self.prod / "admin@nvidia.com"
        self.home = self.workspace / "home"

    # ----- environment and processes -----------------------------------------------------------
    def env(self, **extra) -> dict:
        """For nvflare's commands: HOME in the workspace, the POC workspace, no MLflow credentials."""
        env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}
        return {**env, "HOME": str(self.home), "NVFLARE_POC_WORKSPACE": str(self.poc_ws), **extra}

    def site_names(self) -> list:
        return [f"site-{i}" for i in range(1, self.sites + 1)]

    def pids(self) -> dict:
        """Every live process whose command line names this POC workspace."""
        return processes.naming(self.poc_ws)

    def part_pids(self, part) -> dict:
        """One participant's processes (server, site-1, ...): its daemon, its process, its jobs."""
        return processes.naming(self.prod / part)

    def all_parts_running(self) -> bool:
        return all(self.part_pids(part) for part in ["server", *self.site_names()])

    def nvflare(self, args, log, env=None, **kw):
        self.workspace.mkdir(parents=True, exist_ok=True)
        return nvflare_cli.run(args, self.workspace / log, env or self.env(), prefix=self.command_prefix, **kw)

    # ----- commands ------------------------------------------------------------------------
    def prepare(self):
        if self.pids():
            self.stop()
        self.home.mkdir(parents=True, exist_ok=True)
        if self.nvflare(["poc", "prepare", "-n", self.sites, "--force"], "prepare.log").returncode != 0:
            raise CliError(f"nvflare poc prepare failed; see {self.workspace / 'prepare.log'}")
        (self.workspace / "last_job_id").unlink(missing_ok=True)  # a job of the old workspace is not in this one
        # After `poc prepare`, which recreates the sites' folders: each site's own local/ folder.
        place_policies(self.site_policies, lambda site: self.prod / site / "local" / POLICY_FILE)
        self.say(
            f"poc: workspace for {self.sites} site(s) in {self.poc_ws} (nvflare CLI config: "
            f"{self.home}/.nvflare/config.conf)"
        )

    def server_credentials(self) -> dict:
        if not self.credentials:
            return {}
        try:
            found = {k: v for k, v in read_env_file(self.credentials).items() if k in CREDENTIAL_VARS}
        except OSError as e:
            raise CliError(f"cannot read credentials file {self.credentials} ({e.strerror})") from None
        if not found:
            raise CliError(f"no MLFLOW_TRACKING_* lines in {self.credentials}")
        return found

    def clear_stale_pid_files(self):
        """After a crash: FLARE's start script refuses to start when the PID in a leftover
        daemon_pid.fl now belongs to another process, and a leftover shutdown.fl stops it at once."""
        if self.pids():
            return
        stale = [f for part in self.prod.iterdir() if part.is_dir() for f in part.iterdir() if f.name in CONTROL_FILES]
        for f in stale:
            f.unlink(missing_ok=True)
        if stale:
            self.say(f"poc: removed {len(stale)} stale PID/control file(s) left by an earlier run")

    def start(self):
        if not self.kit.is_dir():
            raise CliError(f"no POC workspace in {self.poc_ws} (run: poc prepare)")
        if self.pids():
            if self.all_parts_running():
                self.say(f"poc: already running ({len(self.pids())} processes)")
                return
            self.say(
                "poc: the server or a site of an earlier start is gone; stopping what is left, then starting afresh"
            )
            self.stop()
        self.clear_stale_pid_files()
        self.after_server_crash()
        self.home.mkdir(parents=True, exist_ok=True)
        # The server alone gets the credentials, in its environment (never on a command line).
        server_env = self.env(**self.server_credentials())
        if self.nvflare(["poc", "start", "-p", "server"], "start-server.log", env=server_env).returncode != 0:
            self.stop(quiet=True)
            raise CliError(f"the FL server did not start; see {self.workspace / 'start-server.log'}")
        site_args = [a for s in self.site_names() for a in ("-p", s)]
        # Sites share this machine's cores: each is told how many run here.
        site_env = self.env(FL_SITES_PER_HOST=str(self.sites))
        if self.nvflare(["poc", "start", *site_args], "start-sites.log", env=site_env).returncode != 0:
            self.stop(quiet=True)
            raise CliError(f"the sites did not start; see {self.workspace / 'start-sites.log'}")
        self.say(f"poc: server and {self.sites} site(s) running ({len(self.pids())} processes)")

    def after_server_crash(self):
        """With the server down: recover the tracking of jobs it left unfinished, then end those
        jobs in FLARE's job store (both no-ops after a clean stop)."""
        # These import MLflow: only here.
        from fl_lightning_mlflow.server.recovery import orphaned_journals
        from fl_lightning_mlflow.server.tracking_uri import temporary_env

        server = self.prod / "server"
        if self.recover and orphaned_journals(server):
            self.say("poc: recovering the tracking of job(s) the FL server left unfinished")
            # This process stands in for the FL server: its credentials, for the recovery only.
            with temporary_env(self.server_credentials()):
                results = recover_tracking(server, self.tracking_uri, say=lambda m: self.say(f"poc: {m}"))
            for run_dir, result in results:
                if isinstance(result, str) or sum(result.get("lost", {}).values()):
                    self.say(f"poc: {run_dir.name}: not recovered in full; run: flctl recover {run_dir}", err=True)
        for job_id in end_zombie_jobs(server):
            self.say(f"poc: job {job_id} was RUNNING when the FL server died; marked {ABORTED} in FLARE's job store")

    def submit(self):
        refuse_userinfo(self.tracking_uri)
        if not self.pids():
            raise CliError("the POC system is not running (run: poc start)")
        # The CIFAR-10 split is ours to make for the CIFAR-10 example's DataModule only; any other
        # DataModule prepares its own data (prepare_data), in its own data_root unless one is given.
        cifar = uses_cifar_data(self.job_src)
        data_root = self.data_root if cifar else self.given_data_root
        if cifar and split_sites([self.data_root]) != self.sites:
            ensure_data(self.data_root, self.sites, offline=self.offline, say=self.say)
        settings = job_settings(self.sites, self.rounds, self.epochs, data_root, self.tracking_uri, self.experiment)
        try:
            job = configure_job(self.job_src, self.workspace / "job" / self.job_src.name, settings)
        except JobConfigError as e:
            raise CliError(f"could not configure the job: {e}") from None
        verdict = f"the job has the problem(s) above; nothing was submitted (job copy: {job})"
        check_or_fail(job, self.sites, str(data_root) if data_root else None, verdict=verdict)
        self.submit_folder(job)

    def submit_folder(self, job):
        """Submit a job folder as it is; its id becomes the last job (wait, download, resume)."""
        result = self.nvflare(["job", "submit", "-j", job, "--startup-kit", self.kit], "submit.log", json_out=True)
        answer = nvflare_cli.parse_json(result.stdout)
        self.job_id = (answer.get("data") or {}).get("job_id")
        if result.returncode != 0 or not self.job_id:
            why = answer.get("message") or nvflare_cli.tail(self.workspace / "submit.log").replace("\n", " ")
            raise CliError(f"job submit failed: {why}")
        (self.workspace / "last_job_id").write_text(f"{self.job_id}\n")
        self.say(f"poc: submitted {Path(job).name} as job {self.job_id}")

    def resume(self):
        from flctl.poc_resume import resume

        resume(self)

    def resolve_job_id(self) -> str:
        if not self.job_id:
            try:
                self.job_id = (self.workspace / "last_job_id").read_text().strip()
            except OSError:
                pass
        if not self.job_id:
            raise CliError("no job id (submit first, or give --job-id)")
        return self.job_id

    def wait(self):
        job_id = self.resolve_job_id()
        self.say(f"poc: waiting for job {job_id} (up to {self.timeout} s)")
        args = ["job", "wait", job_id, "--timeout", self.timeout, "--startup-kit", self.kit]
        waiter = nvflare_cli.popen(args, self.workspace / "wait.log", self.env(), prefix=self.command_prefix)
        try:
            # Watch the server meanwhile: if it is gone, nothing will ever finish the job.
            while waiter.poll() is None and self.part_pids("server"):
                time.sleep(1)
            if not self.part_pids("server"):
                waiter.kill()
                waiter.communicate()
                self.say(f"poc: the FL server stopped while job {job_id} ran; stopping the sites", err=True)
                self.stop(err=True)
                raise CliError(f"the FL server stopped during job {job_id}; its log: {self.prod}/server/log.txt")
            # nvflare's JSON answer; an error's may go to stderr (the log) instead of stdout
            answer = nvflare_cli.parse_json(waiter.communicate()[0])
            answer = answer or nvflare_cli.parse_json(nvflare_cli.tail(self.workspace / "wait.log", 200))
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
        status = (answer.get("data") or {}).get("status") or answer.get("error_code") or "no status"
        if waiter.returncode == WAIT_EXIT_TIMEOUT:
            raise CliError(f"job {job_id} did not finish within {self.timeout} s")
        if waiter.returncode != 0 or answer.get("status") != "ok":
            raise CliError(f"job {job_id} failed: {status} (see {self.workspace / 'wait.log'})")
        self.say(f"poc: job {job_id} finished: {status}")
        if not self.pids():
            raise CliError("the POC system stopped while the job ran")

    def download(self):
        job_id = self.resolve_job_id()
        results = self.workspace / "results"
        results.mkdir(parents=True, exist_ok=True)
        args = ["job", "download", job_id, "-o", results, "--force", "--startup-kit", self.kit]
        if self.nvflare(args, "download.log").returncode != 0:
            raise CliError(f"download of job {job_id} failed; see {self.workspace / 'download.log'}")
        result = results / job_id / "workspace"
        self.say(f"poc: results in {result}")
        models = sorted(result.rglob(MODEL_FILE))
        if models:
            self.say(f"global model:    {models[0]}")
        if (result / "mlflow.db").is_file():
            self.say(f"view it with:    mlflow ui --backend-store-uri sqlite:///{result / 'mlflow.db'}")
        stats = read_stats(result)
        if stats is not None:
            lost = sum(stats.get("lost", {}).values())
            self.say(
                f"MLflow runs:     status {stats.get('status')}; "
                f"{sum(stats.get('written', {}).values())} items written, {lost} lost"
            )
            if stats.get("status") != "FINISHED" or lost:
                raise CliError(
                    f"job {job_id}: tracking ended {stats.get('status')} "
                    f"({stats.get('failure') or f'{lost} item(s) lost'})"
                )

    def stop(self, quiet=False, err=False):
        say = (lambda msg: None) if quiet else (lambda msg: self.say(msg, err=err))
        if self.kit.is_dir() and self.part_pids("server"):  # graceful needs the server: it relays the stop
            try:
                self.nvflare(["poc", "stop"], "stop.log", timeout=120)
            except Exception:  # noqa: BLE001 - whatever nvflare did, what is left is ended by PID below
                pass
            processes.wait_gone(list(self.pids()), 30)
        left = self.pids()
        if left:  # whatever nvflare did not end: by PID, gently, then not
            processes.end(list(left), grace=3)
        left = self.pids()
        if left:
            raise CliError(f"POC processes still running: {' '.join(map(str, left))}")
        say("poc: stopped")

    def clean(self):
        self.stop()
        shutil.rmtree(self.poc_ws, ignore_errors=True)
        shutil.rmtree(self.workspace / "job", ignore_errors=True)
        (self.workspace / "last_job_id").unlink(missing_ok=True)
        self.say(f"poc: removed {self.poc_ws}")

    def status(self):
        found = self.pids()
        if not found:
            self.say("poc: not running")
        for pid, line in sorted(found.items()):
            self.say(f"{pid:>7} {line[:160]}")

    def run(self):
        started = time.monotonic()
        try:
            for step in (self.prepare, self.start, self.submit, self.wait, self.download):
                step()
        except BaseException:
            self.stop(quiet=True)
            raise
        self.stop()
        self.say(f"poc: whole cycle in {time.monotonic() - started:.0f} s")
