"""A job in the running POC system: submit it, wait for it, download its result (flctl poc).

A part of flctl.poc.Poc (whose docstring tells the commands). It reads the attributes Poc's
constructor sets (job_src, sites, rounds, epochs, offline, data_root, given_data_root,
tracking_uri, experiment, timeout, job_id, workspace, kit, prod, say) and uses PocSystem's
nvflare, env, pids, part_pids and stop.
"""

import time
from pathlib import Path

from fl_lightning_mlflow.server.tracking_uri import USERINFO, redact_uri
from flctl import nvflare_cli, processes
from flctl.check_job import check_or_fail, split_sites
from flctl.configure import JobConfigError, configure_job
from flctl.errors import CliError
from flctl.outcome import MODEL_FILE, read_stats
from flctl.simulate import ensure_data, job_settings, uses_cifar_data

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


class PocJobs:
    """submit, wait, download, resume: the job's side of the POC cycle, through the admin's kit."""

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
        self.wait_for_job_process(job_id)

    def wait_for_job_process(self, job_id: str, limit: float = 300) -> None:
        """FLARE may call a job finished while its server job process still runs: there the
        tracker writes the last of the runs (its final flush). Return once that process is gone,
        so what follows (download, reading MLflow) sees the runs complete."""

        def job_process():
            return processes.naming(self.prod / "server", lambda line: "runner_process" in line and job_id in line)

        deadline, said = time.monotonic() + limit, False
        while job_process():
            if time.monotonic() > deadline:
                self.say(f"poc: job {job_id}'s server process still runs after {limit:.0f} s; not waiting longer")
                return
            if not said:
                self.say(f"poc: job {job_id}'s server process is finishing (the tracker's last writes)")
                said = True
            time.sleep(0.5)

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
