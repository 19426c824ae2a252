"""`flctl poc`: the command line of flctl.poc."""

from flctl import poc as poc_module
from flctl.errors import DEFAULT_JOB, positive_int
from flctl.poc import COMMANDS, Poc
from flctl.policy import site_policy


def register(subparsers) -> None:
    p = subparsers.add_parser("poc", help="run a job in FLARE's POC mode", description=poc_module.__doc__)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--workspace", default="/tmp/nvflare/poc-hello", help="everything goes here (default %(default)s)")
    p.add_argument("--sites", type=positive_int, default=2, help="number of sites (default 2)")
    p.add_argument("--job", default=DEFAULT_JOB, help="job under jobs/ or a job folder (default %(default)s)")
    p.add_argument("--rounds", type=positive_int, default=2, help="FL rounds (default 2)")
    p.add_argument("--epochs", type=positive_int, default=1, help="local epochs (default 1)")
    p.add_argument("--offline", action="store_true", help="offline dataset (default data root .../offline-cifar10)")
    p.add_argument("--data-root", help="data folder (prepared if its split does not match)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for the FL server (default: SQLite in its job folder)")
    p.add_argument("--credentials", help="MLFLOW_TRACKING_USERNAME=/PASSWORD= file, for the FL server only")
    p.add_argument("--timeout", type=positive_int, default=1800, help="seconds to wait for the job (default 1800)")
    p.add_argument("--job-id", help="job for wait/download (default: the last one submitted from this workspace)")
    p.add_argument("--site-policy", type=site_policy, action="append", metavar="SITE=FILE",
                   help="prepare, run: a site's disclosure policy (JSON; repeat per site; flctl policy)")  # fmt: skip
    p.add_argument("--no-recover", action="store_true", help="start: leave unfinished tracking of a dead server's jobs")
    p.set_defaults(func=run)


def run(args) -> int:
    poc = Poc(
        args.workspace,
        args.sites,
        args.job,
        args.rounds,
        args.epochs,
        args.offline,
        args.data_root,
        args.tracking_uri,
        args.credentials,
        args.timeout,
        args.job_id,
        recover=not args.no_recover,
        site_policies=dict(args.site_policy or []),
    )
    getattr(poc, args.command)()
    return 0
