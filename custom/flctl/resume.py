"""Resume a job whose FL server died: training goes on from its last global model, into its runs.

    flctl resume SERVER_JOB_DIR --job JOB [--out DIR] [--startup-kit KIT] [--tracking-uri URI]
                 [--credentials FILE] [--timeout S]

SERVER_JOB_DIR is the dead job's folder in the FL server's workspace (POC:
.../prod_00/server/<job_id>; provisioned: <server workspace>/<job_id>), read on the FL server's
host; JOB is the job folder as it was submitted. The job's tracking is recovered first (as
`flctl recover`), then a continuation job is written to DIR (default: SERVER_JOB_DIR's
parent/<job_id>-resume): rounds from the one after the last completed round, starting from the
last persisted global model and the best key metric value so far, writing into the same MLflow
runs; every other setting is the job's own. With --startup-kit the continuation is submitted
(`nvflare job submit`) and waited for as `flctl poc wait` does; without, the command to submit
it is printed. It refuses in one line when there is nothing to resume (a finished job, no
completed round, no persisted model, a changed model class) and for server state a resume
cannot carry (FLARE's own SCAFFOLD workflow or FedOpt generator, which persist nothing; a missing
or damaged state file of the last round). SCAFFOLD's global controls and FedOpt's server
optimizer, as our ResumableScaffold and ResumableFedOpt persist them, go on. A continuation that dies
too is resumed the same way, from its own folder. `flctl poc resume` does all this in POC;
`flctl simulate --resume RUN_DIR` in the simulator.
"""

import json
import os
from pathlib import Path

from flctl import nvflare_cli
from flctl.errors import CliError, positive_int
from flctl.mlflow_server import CREDENTIAL_VARS, read_env_file
from flctl.resume_job import prepare


def submit_and_wait(job: Path, kit, timeout: int, logs: Path, say=print) -> str:
    """nvflare job submit, then job wait; returns the job id, or CliError naming the log."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}  # the sites' side never gets them
    result = nvflare_cli.run(["job", "submit", "-j", job, "--startup-kit", kit], logs / "submit.log", env,
                             json_out=True)  # fmt: skip
    answer = nvflare_cli.parse_json(result.stdout)
    job_id = (answer.get("data") or {}).get("job_id")
    if result.returncode != 0 or not job_id:
        raise CliError(f"job submit failed: {answer.get('message') or nvflare_cli.tail(logs / 'submit.log')}")
    say(f"resume: submitted the continuation as job {job_id}; waiting (up to {timeout} s)")
    args = ["job", "wait", job_id, "--timeout", timeout, "--startup-kit", kit]
    result = nvflare_cli.run(args, logs / "wait.log", env, timeout=timeout + 60, json_out=True)
    answer = nvflare_cli.parse_json(result.stdout) or nvflare_cli.parse_json(nvflare_cli.tail(logs / "wait.log", 200))
    status = (answer.get("data") or {}).get("status") or answer.get("error_code") or "no status"
    if result.returncode != 0 or answer.get("status") != "ok":
        raise CliError(f"job {job_id} failed: {status} (see {logs / 'wait.log'})")
    say(f"resume: job {job_id} finished: {status}")
    return job_id


def register(subparsers) -> None:
    p = subparsers.add_parser("resume", help="resume a job whose FL server died", description=__doc__)
    p.add_argument("server_job_dir", help="the dead job's folder in the FL server's workspace")
    p.add_argument("--job", required=True, help="the job folder as it was submitted")
    p.add_argument("--out", help="where the continuation job goes (default: SERVER_JOB_DIR-resume)")
    p.add_argument("--startup-kit", help="an admin startup kit: submit the continuation and wait for it")
    p.add_argument("--tracking-uri", help="the runs' tracking URI, if not the one the job recorded")
    p.add_argument("--credentials", help="MLFLOW_TRACKING_USERNAME=/PASSWORD= file (else the environment)")
    p.add_argument("--timeout", type=positive_int, default=3600, help="seconds to wait for the job (default 3600)")
    p.set_defaults(func=run)


def run(args) -> int:
    server_job = Path(args.server_job_dir).expanduser().resolve()
    job = Path(args.job).expanduser().resolve()
    if not server_job.is_dir():
        raise CliError(f"no folder {server_job}")
    if not (job / "meta.json").is_file() and not (job / "meta.conf").is_file():
        raise CliError(f"--job {job} is not a job folder (no meta.json)")
    if args.credentials:
        try:
            found = {k: v for k, v in read_env_file(args.credentials).items() if k in CREDENTIAL_VARS}
        except OSError as e:
            raise CliError(f"cannot read credentials file {args.credentials} ({e.strerror})") from None
        os.environ.update(found)  # this process stands in for the FL server towards MLflow
    out = Path(args.out).expanduser().resolve() if args.out else server_job.with_name(server_job.name + "-resume")
    prepared = prepare(server_job, job, out / job.name, args.tracking_uri, say=print)
    print(prepared.summary())
    print(f"resume: continuation job in {prepared.job}")
    (out / "resume_plan.json").write_text(json.dumps(prepared.plan, indent=1))
    if not args.startup_kit:
        print(f"resume: submit it with: nvflare job submit -j {prepared.job} --startup-kit KIT")
        return 0
    submit_and_wait(prepared.job, Path(args.startup_kit).expanduser(), args.timeout, out / "logs")
    return 0
