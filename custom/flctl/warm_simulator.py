"""`nvflare simulator`, with each site's worker kept between its turns (flctl.warm_sites).

    python -m flctl.warm_simulator JOB -w WORKSPACE -n SITES -t THREADS [--keep-workers K]
                                   [nvflare simulator's other options]

Takes `nvflare simulator`'s own options and runs FLARE's SimulatorRunner, whose sites run in
WarmSiteRunner instead of FLARE's SimulatorClientRunner. flctl simulate uses it when it runs
fewer threads than sites. --keep-workers K parks at most K idle workers (default: as many as
memory allows). Workers are forked from one process that imported torch and Lightning once
(flctl.worker_zygote); --no-fork starts each as a new process, as FLARE does.
"""

import argparse
import os
import sys

import nvflare
from nvflare.fuel.utils.log_utils import FL_LOG_LEVEL, LogMode
from nvflare.private.fed.app.simulator.simulator import define_simulator_parser
from nvflare.private.fed.app.simulator.simulator_runner import SimulatorRunner
from nvflare.private.fed.app.utils import version_check

from flctl.warm_sites import WarmSiteRunner
from flctl.worker_zygote import ZygoteClient

SUPPORTED_NVFLARE = "2.9."  # the simulator's worker protocol WarmSiteRunner speaks


class WarmSimulatorRunner(SimulatorRunner):
    """FLARE's simulator; only its sites' runner differs."""

    def __init__(self, *args, keep_workers=None, fork=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_workers, self.fork, self.zygote = keep_workers, fork, None

    def simulator_run_main(self):
        # The zygote imports while the server starts; it ends with the run.
        self.zygote = ZygoteClient(os.environ.copy()) if self.fork else None
        try:
            return super().simulator_run_main()
        finally:
            if self.zygote is not None:
                self.zygote.close()

    def client_run(self, server_custom_folder, clients, gpu):
        runner = WarmSiteRunner(server_custom_folder, self.args, clients, self.client_config, self.deploy_args,
                                self.build_ctx, keep=self.keep_workers, zygote=self.zygote)  # fmt: skip
        runner.run(gpu)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flctl.warm_simulator", description=__doc__.splitlines()[0])
    define_simulator_parser(parser)
    parser.add_argument("--keep-workers", type=int, help="park at most K idle site workers (default: memory)")
    parser.add_argument("--no-fork", action="store_true", help="start each worker as a new process (no zygote)")
    args = parser.parse_args(argv)
    if not nvflare.__version__.startswith(SUPPORTED_NVFLARE):
        why = f"nvflare {nvflare.__version__} is not {SUPPORTED_NVFLARE}x, whose simulator worker it drives"
        print(f"flctl.warm_simulator: {why}; run `nvflare simulator` (flctl simulate --cold-turns)", file=sys.stderr)
        return 2
    if args.keep_workers is not None and args.keep_workers < 0:
        parser.error(f"--keep-workers must be 0 or more, not {args.keep_workers}")
    version_check()
    runner = WarmSimulatorRunner(
        job_folder=args.job_folder,
        workspace=args.workspace,
        clients=args.clients,
        n_clients=args.n_clients,
        threads=args.threads,
        gpu=args.gpu,
        log_config=args.log_config or os.environ.get(FL_LOG_LEVEL, LogMode.CONCISE),
        max_clients=args.max_clients,
        end_run_for_all=args.end_run_for_all,
        keep_workers=args.keep_workers,
        fork=not args.no_fork,
    )
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
