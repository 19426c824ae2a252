"""Run a job in the FLARE simulator, from data to verdict.

    flctl simulate [--job NAME|DIR] [--offline] [--sites N] [--rounds R] [--epochs E] ...

Prepares the data and the per-site split when the split on disk is not the one asked for,
configures a copy of the job (the job's own folder is never edited), checks it (flctl check)
and starts nothing when it has a problem, runs `nvflare simulator`, then judges the run from
what it left (the tracker's stats file, the global model files, the rounds on the federation's
MLflow run), prints the final global model's test metrics (the module's own test_step on the
DataModule's test loader), the best round by the key metric, where the MLflow data is and how
to view it. The CIFAR-10 split is prepared only for jobs that train the CIFAR-10 example's
DataModule; any other DataModule prepares its own data (its prepare_data, as Lightning's).
Each run gets its own folder WORKSPACE/runs/<time>; WORKSPACE/latest points to it.

    flctl simulate --resume RUN_DIR [--tracking-uri URI] [--threads N] [--gpu IDS]

goes on with a run that was killed mid-job (flctl.sim_resume): from its last global model, at
the round after its last completed one, into its own MLflow runs; the job's settings stay its own.

--threads N below --sites runs N sites at a time. FLARE's simulator would then start a new worker
process for every task of every site (torch imported, the app and the site's engine built and its
data loaded, each time); flctl runs the same simulator with each site's worker kept between its
turns instead (flctl.warm_sites; --cold-turns for FLARE's own).

--site-policy SITE=FILE gives a site its disclosure policy (docs/site-policy.md), checked first and
placed where the simulator's site reads it: the simulator workspace's local/ folder, which every
site copies, as disclosure_policy.SITE.json.
"""

import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fl_lightning_mlflow.common.protocol import BEST_MODEL_STATS_KEY, SITE_STATE_ENV
from flctl import data_prep
from flctl.check_job import check_or_fail
from flctl.configure import JobConfigError, configure_job
from flctl.errors import DEFAULT_JOB, CliError, default_data_root, positive_int, resolve_job
from flctl.outcome import Outcome, judge
from flctl.policy import site_policy as policy_arg
from flctl.processes import end_group

# Shown while the simulator runs (display only: the verdict comes from flctl.outcome).
PROGRESS = re.compile(r"round \d+:|aggregating|new best|ERROR")


@dataclass
class Simulation:
    run_dir: Path
    job: Path
    server_dir: Path
    returncode: int
    log: str
    outcome: Outcome | None = None
    test_metrics: dict | None = None
    n_test: int | None = None


SITE_STATE_DIR = "site_state"  # in flctl's WORKSPACE, beside runs/: what the sites keep across runs
LINGER = 5.0  # seconds to read what is left once the command itself has exited


class RoundProgress:
    """What flctl simulate shows while the simulator runs: the lines PROGRESS matches and, once a
    round is aggregated, `round i of R done; E s elapsed, about T s of rounds left` (T: the mean
    round so far, times the rounds to go; cross-site evaluation and shutdown follow the last)."""

    AGGREGATING = re.compile(r"aggregating \d+ update\(s\) at round (\d+)")

    def __init__(self, rounds: int, pattern=PROGRESS, clock=time.monotonic):
        self.rounds, self.pattern, self.clock = rounds, pattern, clock
        self.started, self.first_round_at, self.done = clock(), None, set()

    def __call__(self, line: str) -> str | None:
        out = [line.rstrip()[:300]] if self.pattern.search(line) else []
        if self.first_round_at is None and "training starts" in line:
            self.first_round_at = self.clock()
        aggregated = self.AGGREGATING.search(line)
        if aggregated and int(aggregated.group(1)) not in self.done:  # FLARE logs it once per logger
            self.done.add(int(aggregated.group(1)))
            now, n = self.clock(), len(self.done)
            per_round = (now - (self.first_round_at or self.started)) / n
            left = per_round * max(0, self.rounds - n)
            out.append(
                f"flctl: round {n} of {self.rounds} done; {now - self.started:.0f} s elapsed, "
                f"about {left:.0f} s of rounds left"
            )
        return "\n".join(out) or None


class SimulatorTimeout(RuntimeError):
    """The simulator ran past its time limit (it was ended with everything it started)."""


def simulator_command(sites: int, threads=None, cold_turns=False) -> list:
    """`nvflare simulator`; with fewer threads than sites, flctl.warm_simulator (the same simulator,
    each site's worker kept between its turns: flctl.warm_sites) unless cold_turns."""
    if threads and threads < sites and not cold_turns:
        return [sys.executable, "-m", "flctl.warm_simulator"]
    return [str(Path(sys.executable).parent / "nvflare"), "simulator"]


def shown_command(sites: int, threads=None, cold_turns=False) -> str:
    """simulator_command as the `running:` line shows it."""
    cmd = simulator_command(sites, threads, cold_turns)
    return "nvflare simulator" if cmd[-1] == "simulator" else "python -m flctl.warm_simulator"


def nvflare_simulator(
    job, workspace, sites: int, threads=None, gpu=None, log_path=None, show=None, env=None, timeout=None,
    site_state=None, cold_turns=False,
) -> subprocess.CompletedProcess:  # fmt: skip
    """`nvflare simulator JOB -n SITES -t THREADS -w WORKSPACE` (simulator_command), through run_logged.
    site_state: a folder that outlives the run, where sites keep their own state (SCAFFOLD's
    controls): the simulator wipes WORKSPACE, and a resumed run needs what the killed one's sites kept."""
    cmd = simulator_command(sites, threads, cold_turns) + [str(job), "-n", str(sites)]
    cmd += ["-t", str(threads or sites), "-w", str(workspace)] + (["-gpu", str(gpu)] if gpu is not None else [])
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}  # lines as they come, not at exit
    if site_state is not None:
        env[SITE_STATE_ENV] = str(site_state)
    return run_logged(cmd, env, log_path, show, timeout)


def run_logged(cmd, env=None, log_path=None, show=None, timeout=None, linger=LINGER) -> subprocess.CompletedProcess:
    """Run cmd in its own process group (ended with everything it started on any way out);
    output to log_path and returned, lines matching show echoed as they come. Past timeout
    seconds (also while it prints nothing), SimulatorTimeout with the last lines it printed."""
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    lines: queue.Queue = queue.Queue()
    # A thread reads the output, so the time limit holds even while the simulator prints nothing.
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True)
    reader.start()
    out, exited_at = [], None
    log = open(log_path, "w") if log_path else None
    try:
        while True:
            now = time.monotonic()
            left = None if not timeout else timeout - (now - started)
            if left is not None and left <= 0:
                tail = "".join(out[-60:])
                raise SimulatorTimeout(
                    f"{shlex.join(map(str, cmd))} did not end within {timeout} s; its last lines:\n{tail}"
                )
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > linger:
                # The command is done, but something it started still holds its output open
                # (a worker that did not exit): that must not keep us waiting; end_group ends it.
                out.append(f"flctl: {cmd[0]} exited {proc.returncode}; ended what it left running\n")
                if log:
                    log.write(out[-1])
                break
            try:
                line = lines.get(timeout=min(left or 1, 1))
            except queue.Empty:
                continue
            if line is None:
                break
            out.append(line)
            if log:
                log.write(line)
            text = show(line) if callable(show) else (line.rstrip()[:300] if show and show.search(line) else None)
            if text:
                print(text, flush=True)
        proc.wait()
    finally:
        if log:
            log.close()
        end_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "")


def ensure_data(data_root, sites, alpha=None, seed=0, offline=False, say=print) -> None:
    if data_prep.split_matches(data_root, sites, alpha, seed):
        say(f"data: using the existing {sites}-site split in {Path(data_root) / 'splits'}")
    else:
        data_prep.prepare(data_root, sites, alpha, seed, offline=offline, say=say)


CIFAR_DATAMODULE = "cifar10_example."  # the example whose split flctl prepare-data makes


def uses_cifar_data(job) -> bool:
    """Whether the job's engine trains the CIFAR-10 example's DataModule (its split is ours to make)."""
    from flctl.evaluate import job_specs

    try:
        _, datamodule = job_specs(job)
    except CliError:
        return False
    return str(datamodule.get("path", "")).startswith(CIFAR_DATAMODULE)


def job_settings(sites, rounds, epochs, data_root, tracking_uri=None, experiment=None, extra=None) -> dict:
    settings = {
        "server.num_rounds": rounds,
        "server.min_clients": sites,
        "meta.min_clients": sites,
        "client.local_epochs": epochs,
    }
    if data_root is not None:
        settings["client.data_root"] = str(data_root)
    if tracking_uri:
        settings["server.tracking_uri"] = tracking_uri
    if experiment:
        settings["server.experiment_name"] = experiment
    return {**settings, **(extra or {})}


def place_policies(sim_ws: Path, site_policies: dict | None) -> None:
    """Each {site: policy file} checked and copied to sim_ws/local/disclosure_policy.<site>.json:
    every simulated site copies the workspace's local/ folder, so each file is named per site."""
    from flctl.policy import place

    place(site_policies, lambda site: sim_ws / "local" / f"disclosure_policy.{site}.json")


def simulate(
    job="hello-lightning-mlflow",
    workspace="/tmp/nvflare/hello-lightning-mlflow",
    data_root=None,
    sites=2,
    rounds=2,
    epochs=1,
    alpha=None,
    seed=0,
    offline=False,
    tracking_uri=None,
    experiment=None,
    threads=None,
    gpu=None,
    extra_settings=None,
    prepare=True,
    check=True,
    evaluate=True,
    say=print,
    show=PROGRESS,
    env=None,
    timeout=None,
    site_policies=None,
    cold_turns=False,
) -> Simulation:
    """The whole run; CliError on a failure before the simulator starts or a failed run."""
    job_src = resolve_job(job)
    cifar = uses_cifar_data(job_src)
    if cifar:
        data_root = default_data_root(data_root, offline)
    elif data_root is not None:
        data_root = Path(data_root).expanduser().resolve()
    workspace = Path(workspace).expanduser().resolve()
    if prepare and cifar:
        ensure_data(data_root, sites, alpha, seed, offline, say)
    run_dir = workspace / "runs" / f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = workspace / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(run_dir)
    settings = job_settings(sites, rounds, epochs, data_root, tracking_uri, experiment, extra_settings)
    try:
        job_copy = configure_job(job_src, run_dir / "job" / job_src.name, settings)
    except JobConfigError as e:
        raise CliError(f"could not configure the job: {e}") from None
    if check:
        verdict = f"the job has the problem(s) above; nothing was started (job copy: {job_copy})"
        say(f"check: {job_copy} is fine ({check_or_fail(job_copy, sites, None, verdict=verdict)})")
    sim_ws = run_dir / "simulator"
    place_policies(sim_ws, site_policies)
    log_path = run_dir / "simulator.log"
    say(f"running: {shown_command(sites, threads, cold_turns)} {job_copy} -n {sites} -t {threads or sites} -w {sim_ws}")
    say(f"(log: {log_path})")
    if show is PROGRESS:
        show = RoundProgress(rounds)
    site_state = workspace / SITE_STATE_DIR  # shared by every run of the workspace (and its resumes)
    result = nvflare_simulator(job_copy, sim_ws, sites, threads, gpu, log_path, show, env, timeout, site_state,
                               cold_turns)  # fmt: skip
    run = Simulation(run_dir, job_copy, sim_ws / "server" / "simulate_job", result.returncode, result.stdout)
    if result.returncode != 0:
        raise CliError(f"the simulator failed (exit {result.returncode}); see {log_path}")
    run.outcome = judge(run.server_dir, rounds, tracking_uri)
    if run.outcome.model is None:  # nothing to evaluate
        raise CliError(f"{run.outcome.problems[0]}; see {log_path}")
    if evaluate:
        from flctl.evaluate import evaluate as evaluate_model

        run.test_metrics, run.n_test = evaluate_model(job_copy, run.outcome.model)
    return run


def report(run: Simulation, tracking_uri, started: float, what: str) -> None:
    o = run.outcome
    print(f"\ndone in {time.monotonic() - started:.0f} s: {what}")
    if run.test_metrics is not None:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(run.test_metrics.items())) or "(no test metric logged)"
        print(f"final global model on {run.n_test} held-out samples: {shown}")
    best = (o.stats or {}).get(BEST_MODEL_STATS_KEY)
    if best:
        better = "lower" if best.get("mode") == "min" else "higher"
        value = best.get("value")
        value = f"{value:.4f}" if isinstance(value, (int, float)) else value
        print(f"best round:      {best.get('round')} ({best.get('key_metric')} {value}; {better} is better)")
    print(f"global models:  {o.model}")
    if o.best_model:
        print(f"                {o.best_model}")
    if o.stats is not None:
        rounds = f"; {o.rounds_done} round(s) logged" if o.rounds_done is not None else ""
        print(f"MLflow runs:     status {o.stats.get('status')}; {o.written} items written, {o.lost} lost{rounds}")
    if not tracking_uri:
        db = run.server_dir / "mlflow.db"
        print(f"MLflow database: {db}")
        print(f"view it with:    mlflow ui --backend-store-uri sqlite:///{db}")
        report_champion(o, f"sqlite:///{db}")
    else:
        print(f"MLflow tracking: {tracking_uri}")
        if tracking_uri.startswith("sqlite:"):
            print(f"view it with:    mlflow ui --backend-store-uri {tracking_uri}")
        else:
            print(f"view it at:      {tracking_uri}")
        report_champion(o, tracking_uri)


def report_champion(outcome, tracking_uri: str) -> None:
    """The best global model's registry URI beside the mlflow ui line, and how to load it."""
    uri = outcome.champion_uri
    if uri:
        print(f"best model:      {uri}  (mlflow.pytorch.load_model('{uri}') with tracking URI {tracking_uri})")


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="run a job in the FLARE simulator", description=__doc__)
    p.add_argument("--job", default=DEFAULT_JOB, help="job under jobs/ or a job folder (default %(default)s)")
    p.add_argument("--offline", action="store_true", help="the offline dataset instead of CIFAR-10")
    p.add_argument("--sites", type=positive_int, default=2, help="number of sites (default 2)")
    p.add_argument("--rounds", type=positive_int, default=2, help="FL rounds (default 2)")
    p.add_argument("--epochs", type=positive_int, default=1, help="local epochs per round (default 1)")
    p.add_argument("--alpha", type=float, help="Dirichlet non-IID split with concentration A (default: IID)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument(
        "--data-root",
        help="data folder (CIFAR-10 jobs: /tmp/nvflare/data/cifar10 or .../offline-cifar10; "
        "other jobs: their data_root variable)",
    )
    p.add_argument("--workspace", default="/tmp/nvflare/hello-lightning-mlflow", help="where runs go")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: mlflow.db in the server's job folder)")
    p.add_argument("--experiment", help="MLflow experiment name (default: the job's)")
    p.add_argument("--threads", type=positive_int, help="sites the simulator runs at once (default: all)")
    p.add_argument("--gpu", help="GPU ids for the simulator's -gpu option, e.g. 0")
    p.add_argument("--cold-turns", action="store_true",
                   help="with fewer threads than sites, FLARE's own turns: a new worker process per task "
                   "(default: each site's worker kept between its turns)")  # fmt: skip
    p.add_argument("--resume", metavar="RUN_DIR", help="go on with a killed run (WORKSPACE/runs/<time> or latest)")
    p.add_argument("--site-policy", type=policy_arg, action="append", metavar="SITE=FILE",
                   help="a site's disclosure policy (JSON; repeat per site; see flctl policy)")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    if args.resume:
        from flctl import sim_resume

        return sim_resume.run(args)
    started = time.monotonic()
    sim = simulate(
        args.job,
        args.workspace,
        args.data_root,
        args.sites,
        args.rounds,
        args.epochs,
        args.alpha,
        args.seed,
        args.offline,
        args.tracking_uri,
        args.experiment,
        args.threads,
        args.gpu,
        site_policies=dict(args.site_policy or []),
        cold_turns=args.cold_turns,
    )
    what = f"{sim.job.name}, {args.sites} sites x {args.rounds} rounds x {args.epochs} epoch(s)"
    report(sim, args.tracking_uri, started, what)
    if not sim.outcome.ok:
        raise CliError("; ".join(sim.outcome.problems) + f" (log: {sim.run_dir / 'simulator.log'})")
    return 0
