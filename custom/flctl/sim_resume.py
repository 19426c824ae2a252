"""`flctl simulate --resume RUN_DIR`: a simulator run that was killed mid-job goes on.

RUN_DIR is the killed run's folder (WORKSPACE/runs/<time>, or WORKSPACE/latest). Its job copy
(RUN_DIR/job/<name>) and its server folder (RUN_DIR/simulator/server/simulate_job) are read,
never changed; recovery writes its journal out first. The continuation gets a run folder of its
own beside it (WORKSPACE/runs/<time>, `latest` points to it; its `resumes` file names RUN_DIR)
and writes into the killed run's MLflow runs, wherever they are (by default its mlflow.db). A
continuation that dies too is resumed the same way, from its own run folder.
"""

import os
import time
from datetime import datetime
from pathlib import Path

from flctl.errors import CliError
from flctl.outcome import judge
from flctl.resume_job import prepare
from flctl.simulate import PROGRESS, SITE_STATE_DIR, RoundProgress, Simulation, nvflare_simulator, report, shown_command

SERVER_JOB = Path("simulator") / "server" / "simulate_job"


def killed_run(run_dir) -> tuple:
    """(run folder, its job copy, its server's job folder), or CliError when run_dir is not one."""
    run_dir = Path(run_dir).expanduser().resolve()
    jobs = sorted(p for p in (run_dir / "job").glob("*") if p.is_dir()) if (run_dir / "job").is_dir() else []
    if len(jobs) != 1 or not (run_dir / SERVER_JOB).is_dir():
        raise CliError(f"{run_dir} is not a run folder of flctl simulate (no job/<name> and {SERVER_JOB})")
    return run_dir, jobs[0], run_dir / SERVER_JOB


def resume_simulation(run_dir, tracking_uri=None, threads=None, gpu=None, evaluate=True, say=print, show=PROGRESS,
                      env=None, timeout=None) -> tuple:  # fmt: skip
    """Recover, build the continuation, run it; returns (Simulation, the plan)."""
    run_dir, job, server_dir = killed_run(run_dir)
    workspace = run_dir.parent.parent  # WORKSPACE/runs/<time>
    new_dir = workspace / "runs" / f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}-resume"
    new_dir.mkdir(parents=True, exist_ok=True)
    try:
        prepared = prepare(server_dir, job, new_dir / "job" / job.name, tracking_uri, say)
    except CliError:
        if not any(new_dir.iterdir()):  # nothing was built: no empty run folder is left behind
            new_dir.rmdir()
        raise
    (new_dir / "resumes").write_text(f"{run_dir}\n")
    latest = workspace / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(new_dir)
    plan = prepared.plan
    say(prepared.summary())
    sites = len(plan["sites"]) or 1
    sim_ws, log_path = new_dir / "simulator", new_dir / "simulator.log"
    say(f"running: {shown_command(sites, threads)} {prepared.job} -n {sites} -t {threads or sites} -w {sim_ws}")
    say(f"(log: {log_path})")
    if show is PROGRESS:
        show = RoundProgress(prepared.rounds_left)
    # The sites' own state (SCAFFOLD's controls) where the killed run's sites kept it.
    site_state = workspace / SITE_STATE_DIR
    result = nvflare_simulator(prepared.job, sim_ws, sites, threads, gpu, log_path, show, env, timeout, site_state)
    run = Simulation(new_dir, prepared.job, sim_ws / "server" / "simulate_job", result.returncode, result.stdout)
    if result.returncode != 0:
        raise CliError(f"the simulator failed (exit {result.returncode}); see {log_path}")
    run.outcome = judge(run.server_dir, plan["num_rounds"], prepared.tracking_uri)
    if run.outcome.model is None:
        raise CliError(f"{run.outcome.problems[0]}; see {log_path}")
    if evaluate:
        from flctl.evaluate import evaluate as evaluate_model

        run.test_metrics, run.n_test = evaluate_model(prepared.job, run.outcome.model)
    return run, plan, prepared.tracking_uri


def run(args) -> int:
    started = time.monotonic()
    sim, plan, uri = resume_simulation(args.resume, args.tracking_uri, args.threads, args.gpu)
    what = (
        f"{sim.job.name} resumed: rounds {plan['start_round']}..{plan['num_rounds'] - 1} of {plan['num_rounds']}, "
        f"into the runs of job {plan['job_id']}"
    )
    report(sim, uri, started, what)
    if not sim.outcome.ok:
        raise CliError("; ".join(sim.outcome.problems) + f" (log: {sim.run_dir / 'simulator.log'})")
    return 0
