"""`flctl poc resume`: the last submitted job (or --job-id), whose FL server died, goes on.

After a crash, `flctl poc start` brings the system back, recovers the dead job's tracking and
ends the job in FLARE's store; `resume` then builds the continuation from the job copy that
`submit` sent (WORKSPACE/job/<name>) and the dead job's folder on the POC server, submits it
and waits for it as `wait` does. The continuation becomes the last job: if it dies too,
`start` then `resume` again.
"""

from flctl.errors import CliError
from flctl.resume_job import prepare


def resume(poc) -> None:
    from fl_lightning_mlflow.server.tracking_uri import temporary_env

    dead_id = poc.resolve_job_id()
    if not poc.all_parts_running():
        raise CliError("the POC system is not running (run: poc start; it recovers the dead job's tracking first)")
    server_job = poc.prod / "server" / dead_id
    src = poc.workspace / "job" / poc.job_src.name
    if not server_job.is_dir() or not src.is_dir():
        raise CliError(f"job {dead_id}: no {server_job if not server_job.is_dir() else src} to resume from")
    dest = poc.workspace / "resume" / dead_id / poc.job_src.name
    with temporary_env(poc.server_credentials()):  # this process stands in for the FL server towards MLflow
        prepared = prepare(server_job, src, dest, poc.tracking_uri, say=lambda m: poc.say(f"poc: {m}"))
    poc.say(f"poc: {prepared.summary()}")
    poc.submit_folder(prepared.job)
    poc.wait()
