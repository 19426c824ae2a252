"""The POC system on this machine: its workspace, processes, start and stop (flctl poc).

A part of flctl.poc.Poc (whose docstring tells the commands): the commands that make the POC
workspace and start, stop, list and clean its processes. It reads the attributes Poc's
constructor sets (workspace, poc_ws, prod, kit, home, sites, credentials, tracking_uri, recover,
site_policies, say) and command_prefix, which the deployment rehearsal overrides.
"""

import os
import shutil

from fl_lightning_mlflow.site.disclosure_policy import POLICY_FILE
from flctl import nvflare_cli, processes
from flctl.errors import CliError
from flctl.job_store import ABORTED, end_zombie_jobs
from flctl.mlflow_server import CREDENTIAL_VARS, read_env_file
from flctl.policy import place as place_policies
from flctl.recover import recover_tracking

CONTROL_FILES = ("daemon_pid.fl", "pid.fl", "shutdown.fl", "restart.fl")


class PocSystem:
    """prepare, start, stop, clean, status: the POC processes, found by their workspace's path."""

    command_prefix = ()  # prepended to every nvflare command (the rehearsal: `ip netns exec` the admin's host)

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
