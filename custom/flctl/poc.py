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

import sys
import time
from pathlib import Path

from flctl.errors import DEFAULT_JOB, default_data_root, resolve_job
from flctl.poc_jobs import PocJobs, refuse_userinfo
from flctl.poc_system import PocSystem

COMMANDS = ("prepare", "start", "submit", "wait", "download", "stop", "clean", "status", "run", "resume")
__all__ = ["COMMANDS", "Poc", "refuse_userinfo", "say"]  # refuse_userinfo: where the tests and callers find it


def say(msg, err=False):
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


class Poc(PocSystem, PocJobs):
    """One POC workspace and its job: the system's commands (flctl.poc_system), the job's
    (flctl.poc_jobs), and run, the whole cycle."""

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
