#!/usr/bin/env python3
"""Resume: does a job killed mid-way and resumed end where an uninterrupted one ends?

    python benchmarks/resume_accuracy.py [--out FILE] [--work DIR] [--seeds 0,1,2] [--quick]

For each seed, on the hard offline set split IID over the sites (the accuracy section's data):
  - an uninterrupted FedAvg job (jobs/hello-lightning-mlflow) of ROUNDS rounds (bench_common.federated);
  - the same job, SIGKILLed with everything it started once its server completed round
    KILL_AFTER, then resumed with flctl simulate --resume's own path (sim_resume) into the same
    runs (the kill is the slow e2e test's: tests/test_resume_e2e.py, one definition of it).
Both final global models are scored the same way: the job's own test_step on the test batch.
The seed sets the split and the global model's initialization; the sites' processes after the
kill are new, so the resumed run's later rounds draw other batches than the uninterrupted run's:
the question is whether the resumed accuracy lies within the uninterrupted runs' seed-to-seed
spread, not whether it is equal. Results: a JSON file (rewritten after every run; a run that
stops continues with the same --out) with each seed's figures and the spread.
"""

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

from bench_common import REPO, federated, make_data, say, spread

from flctl.data_prep import HARD_DIFFICULTY as HARD
from flctl.evaluate import evaluate
from flctl.sim_resume import resume_simulation

sys.path.insert(0, str(REPO / "tests"))  # the kill the slow e2e test does: one definition of the scenario
from test_resume_e2e import run_and_kill_after_round  # noqa: E402

JOB = "hello-lightning-mlflow"
KILL_AFTER = 2


def settings(quick: bool) -> dict:
    if quick:
        return {"sites": 2, "rounds": 4, "epochs": 1, "train_size": 2000, "test_size": 1000}
    return {"sites": 3, "rounds": 5, "epochs": 1, "train_size": 6000, "test_size": 2000}


def resumed_run(work: Path, data, cfg: dict, seed: int) -> dict:
    """Killed after KILL_AFTER, resumed; the final global model's test accuracy and the times."""
    workspace = work / f"resumed-{seed}"
    started = time.time()
    killed = run_and_kill_after_round(
        workspace, data, KILL_AFTER, timeout=1200, job=REPO / "jobs" / JOB, sites=cfg["sites"],
        rounds=cfg["rounds"], settings={"server.seed": seed},
    )  # fmt: skip
    killed_at = time.time()
    run, plan, _ = resume_simulation(killed, evaluate=False, say=lambda msg: None, show=None, timeout=1800)
    if not run.outcome.ok:
        raise RuntimeError(f"the resumed run of seed {seed} failed: {'; '.join(run.outcome.problems)}")
    return {
        "test_acc": evaluate(run.job, run.outcome.model)[0]["test_acc"],
        "killed_after_round": plan["last_round"],
        "killed_s": killed_at - started,
        "resume_s": time.time() - killed_at,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / f"resume-accuracy-{date.today()}.json"))
    p.add_argument("--work", default="/tmp/resume-accuracy-work", help="runs and data (not kept in git)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="2 sites, 4 rounds, 2,000 images: a smoke run")
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work)
    results = json.loads(out.read_text()) if out.is_file() else {}
    cfg = results.setdefault("config", {**settings(args.quick), "job": JOB, "kill_after": KILL_AFTER})
    cfg.update(split="iid", difficulty=HARD)
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = results.setdefault("seeds", {})

    def save():
        out.write_text(json.dumps(results, indent=1) + "\n")

    begun = time.time()
    for seed in seeds:
        cell = cells.setdefault(str(seed), {})
        data = make_data(work / "data", cfg["train_size"], cfg["sites"], None, seed, cfg["test_size"], HARD)
        if "uninterrupted" not in cell:
            fed = federated(work, data, cfg["sites"], cfg["rounds"], cfg["epochs"], f"uninterrupted-{seed}", job=JOB,
                            extra={"server.seed": seed})  # fmt: skip
            cell["uninterrupted"] = {"test_acc": fed["test_acc"], "wall_s": fed["wall_s"]}
            say(f"seed {seed}: uninterrupted, test accuracy {fed['test_acc']:.4f} ({fed['wall_s']:.0f} s)")
            save()
        if "resumed" not in cell:
            cell["resumed"] = resumed_run(work, data, cfg, seed)
            say(f"seed {seed}: killed after round {KILL_AFTER} and resumed, test accuracy "
                f"{cell['resumed']['test_acc']:.4f}")  # fmt: skip
            save()
    done = [cells[str(s)] for s in seeds if "resumed" in cells.get(str(s), {})]
    uninterrupted = spread([c["uninterrupted"]["test_acc"] for c in done])
    resumed = spread([c["resumed"]["test_acc"] for c in done])
    inside = [uninterrupted["min"] <= c["resumed"]["test_acc"] <= uninterrupted["max"] for c in done]
    results["summary"] = {
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "resumed_minus_uninterrupted_by_seed": [
            c["resumed"]["test_acc"] - c["uninterrupted"]["test_acc"] for c in done
        ],
        "resumed_within_uninterrupted_range": sum(inside),
    }
    results["total_s"] = results.get("total_s", 0) + time.time() - begun
    save()
    say(f"uninterrupted {uninterrupted['min']:.4f}..{uninterrupted['max']:.4f}, resumed {resumed['values']}; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
