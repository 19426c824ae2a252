"""What every benchmark section shares: progress lines, data, a quiet Trainer, one simulator run.

A simulator run goes through flctl simulate's own path (configure a copy, run, judge from the
tracker's stats file and FLARE's model files); the log's time stamps only say where the time went.
"""

import os
import platform
import re
import shutil
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch

from flctl import data_prep
from flctl.errors import CliError
from flctl.evaluate import evaluate
from flctl.outcome import PARENT_KEY
from flctl.simulate import simulate

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
AGGREGATED = re.compile(r"aggregating \d+ update\(s\) at round")


def say(msg):
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def log_time(line):
    m = STAMP.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def first_time(lines, pattern):
    times = [t for ln in lines if re.search(pattern, ln) and (t := log_time(ln)) is not None]
    return min(times) if times else None


def last_time(lines, pattern):
    times = [t for ln in lines if re.search(pattern, ln) and (t := log_time(ln)) is not None]
    return max(times) if times else None


def spread(values) -> dict:
    """median, mean, min, max and standard deviation of a list of numbers."""
    values = [float(v) for v in values]
    return {
        "n": len(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def make_data(root: Path, train_size: int, sites: int, alpha=None, seed=0, test_size=2000, difficulty=0.0) -> Path:
    """The offline set (generated once per folder), split over the sites (rewritten every call)."""
    from cifar10_example.data import read_train_set

    if not (root / "cifar-10-batches-py" / "test_batch").exists():
        data_prep.generate_offline(root, train_size=train_size, test_size=test_size, difficulty=difficulty)
    _, labels = read_train_set(root)
    data_prep.write_splits(root, labels, sites, alpha, seed, 0.1)
    return root


def global_test_accuracy(net, data_root) -> tuple:
    """(accuracy, test images) of a CIFAR-10 example network on the test batch."""
    import torch

    from cifar10_example.data import read_test_set, to_tensor

    images, labels = read_test_set(data_root, site="server")
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), 500):
            correct += int((net(to_tensor(images[i : i + 500])).argmax(dim=1).numpy() == labels[i : i + 500]).sum())
    return correct / len(labels), len(labels)


def quiet_trainer(**kwargs):
    import pytorch_lightning as pl

    return pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def federated(
    work: Path,
    data_root,
    sites,
    rounds,
    epochs,
    name,
    job="hello-lightning-mlflow",
    extra=None,
    tracking_uri=None,
    experiment=None,
    threads=None,
    cold_turns=False,
) -> dict:
    """One simulator run of a job under jobs/; wall time split at the first `train` task and the
    last aggregation; test accuracy of the final global model on the test batch."""
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.time()
    try:
        run = simulate(
            job,
            run_dir,
            data_root,
            sites,
            rounds,
            epochs,
            tracking_uri=tracking_uri,
            experiment=experiment,
            threads=threads,
            extra_settings=extra or {},
            prepare=False,
            check=False,
            evaluate=False,
            say=lambda msg: None,
            show=None,
            cold_turns=cold_turns,
        )
    except CliError as e:
        raise RuntimeError(f"simulator failed ({name}): {e}") from None
    ended = time.time()
    if not run.outcome.ok:
        raise RuntimeError(f"simulator run {name} failed: {'; '.join(run.outcome.problems)}; see {run.run_dir}")
    lines = run.log.splitlines()
    first_train = first_time(lines, "training starts")
    last_agg = last_time(lines, AGGREGATED.pattern)
    fit = [float(x) for x in re.findall(r"steps in ([\d.]+) s", run.log)]
    acc = evaluate(run.job, run.outcome.model)[0]["test_acc"]  # the job's own module and test_step
    out = {
        "wall_s": ended - started,
        "startup_s": first_train - started,
        "rounds_s": last_agg - first_train,
        "shutdown_s": ended - last_agg,
        "site_fit_s": sum(fit),
        "test_acc": acc,
        "started": started,
        "log": str(run.run_dir),
    }
    stats = run.outcome.stats
    if stats is not None:
        out["tracked_points"] = sum(c.get("metric", 0) for c in stats["received"].values())
        out["lost"] = sum(stats["lost"].values())
        out["max_event_ms"] = stats["max_event_seconds"] * 1000
        out["parent_run_id"] = (stats.get("run_ids") or {}).get(PARENT_KEY)
    out["_lines"] = lines  # for the sections that read more from the log; dropped before saving
    return out


def machine() -> dict:
    try:
        model = next(
            ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln
        )
    except (OSError, StopIteration):
        model = platform.processor()
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = None
    from importlib import metadata

    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{d: metadata.version(d) for d in ("nvflare", "pytorch-lightning", "mlflow")},
        "gpu": torch.cuda.is_available(),
    }
