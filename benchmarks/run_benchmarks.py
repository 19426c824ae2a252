#!/usr/bin/env python3
"""Benchmarks: federated and tracking overhead, the MLflow write path, accuracy and scaling.

    python benchmarks/run_benchmarks.py [--quick] [--out DIR]

Everything runs here, in one go, on the same generated data and model, so every ratio is
measured within one run on one machine. Prints a table at the end, writes results.json and
PNG plots to --out (default benchmarks/results/<time>).
"""

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from fl_lightning_mlflow.site.data import SiteDataModule, read_train_set, split_path, tensor_dataset
from flctl import data_prep
from flctl.errors import CliError
from flctl.evaluate import global_test_accuracy, load_global_model
from flctl.simulate import simulate

REPO = Path(__file__).resolve().parents[1]

JOB = REPO / "jobs" / "hello-lightning-mlflow"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def say(msg):
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def log_time(line):
    m = STAMP.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


# ----- data ------------------------------------------------------------------------------------
def make_data(root: Path, train_size: int, sites: int, alpha=None, seed=0) -> Path:
    if not (root / "cifar-10-batches-py" / "test_batch").exists():
        data_prep.generate_offline(root, train_size=train_size, test_size=2000)
    _, labels = read_train_set(root)
    data_prep.write_splits(root, labels, sites, alpha, seed, 0.1)
    return root


# ----- 1. reference: plain Lightning, no FLARE ---------------------------------------------------
def reference(data_root, sites, rounds, epochs, batch=32, lr=0.02):
    """Each site's share trained for rounds x epochs, sites one after another, all cores."""
    import pytorch_lightning as pl

    from fl_lightning_mlflow.site.lit_module import LitCifarNet

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    per_site = {}
    for i in range(1, sites + 1):
        site = f"site-{i}"
        pl.seed_everything(0, verbose=False)
        data = SiteDataModule(str(data_root), site, batch_size=batch)
        data.load()
        model = LitCifarNet(lr=lr)
        started = time.perf_counter()
        for _ in range(rounds):
            trainer = quiet_trainer(max_epochs=epochs)
            trainer.validate(model, datamodule=data, verbose=False)  # as the site does each round
            trainer.fit(model, datamodule=data)
        per_site[site] = time.perf_counter() - started
    return {"compute_s": sum(per_site.values()), "per_site_s": per_site}


def centralized(data_root, sites, total_epochs, batch=32, lr=0.02):
    """The union of the sites' training data, trained for the same total epochs: test accuracy."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from fl_lightning_mlflow.site.lit_module import LitCifarNet

    images, labels = read_train_set(data_root)
    shares = [json.loads(split_path(data_root, f"site-{i}").read_text())["train"] for i in range(1, sites + 1)]
    idx = np.concatenate(shares)
    pl.seed_everything(0, verbose=False)
    model = LitCifarNet(lr=lr)
    model.net.load_state_dict(initial_global_state())
    started = time.perf_counter()
    loader = DataLoader(tensor_dataset(images[idx], labels[idx]), batch_size=batch, shuffle=True)
    quiet_trainer(max_epochs=total_epochs).fit(model, loader)
    acc, _ = global_test_accuracy(model.net.eval(), data_root)
    return {"test_acc": acc, "seconds": time.perf_counter() - started, "epochs": total_epochs}


def initial_global_state():
    from fl_lightning_mlflow.common.network import CifarNet

    return CifarNet(init_seed=0).state_dict()  # what the job's persistor starts from


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


# ----- 2./3. the federated job in the simulator ----------------------------------------------------
def federated(work: Path, data_root, sites, rounds, epochs, tracking=True, log_every=10, name="fed"):
    """flctl simulate's own path (configure a copy, run, judge from the tracker's stats file and
    FLARE's model files); the log's time stamps only measure where the time went."""
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = {"client.tracking": tracking, "client.log_every_n_steps": log_every}
    started = time.time()
    try:
        run = simulate(
            JOB,
            run_dir,
            data_root,
            sites,
            rounds,
            epochs,
            extra_settings=extra,
            prepare=False,
            check=False,
            evaluate=False,
            say=lambda msg: None,
            show=None,
        )
    except CliError as e:
        raise RuntimeError(f"simulator failed ({name}): {e}") from None
    ended = time.time()
    if not run.outcome.ok:
        raise RuntimeError(f"simulator run {name} failed: {'; '.join(run.outcome.problems)}; see {run.run_dir}")
    log = run.log
    lines = log.splitlines()
    first_train = min(log_time(ln) for ln in lines if "training starts" in ln)
    last_agg = max(log_time(ln) for ln in lines if re.search(r"aggregating \d+ update\(s\) at round", ln))
    fit = [float(x) for x in re.findall(r"steps in ([\d.]+) s", log)]
    site_task = [float(x) for x in re.findall(r"train task took ([\d.]+) s", log)]
    server = run.server_dir
    acc, _ = global_test_accuracy(load_global_model(run.outcome.model), data_root)
    out = {
        "wall_s": ended - started,
        "startup_s": first_train - started,
        "rounds_s": last_agg - first_train,
        "shutdown_s": ended - last_agg,
        "site_fit_s": sum(fit),
        "site_train_task_s": sum(site_task),
        "test_acc": acc,
    }
    stats = run.outcome.stats
    if stats is not None:
        out["tracked_points"] = sum(c.get("metric", 0) for c in stats["received"].values())
        out["lost"] = sum(stats["lost"].values())
        out["max_event_ms"] = stats["max_event_seconds"] * 1000
        out["global_acc_per_round"] = global_curves(server / "mlflow.db")
    return out


def global_curves(db):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("hello-lightning-mlflow")
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("role") == "federation"]
    curves = {}
    for key in parent.data.metrics:
        if key.startswith("global_val_acc"):
            hist = sorted(client.get_metric_history(parent.info.run_id, key), key=lambda m: m.step)
            curves[key] = [m.value for m in hist]
    return curves


# ----- 4. the write path alone ---------------------------------------------------------------------
def write_path(uri, k_sites, points_per_site, artifact_dir=None):
    from mlflow.tracking import MlflowClient

    from fl_lightning_mlflow.server.write_queue import WriteQueue

    client = MlflowClient(uri)
    exp_name = f"write-path-{time.time_ns()}"
    exp = client.create_experiment(exp_name, artifact_location=artifact_dir)
    queue = WriteQueue(uri, Path(tempfile.mkdtemp()) / "journal", actions={})
    for k in range(k_sites):
        queue.run_ids[f"site-{k}"] = client.create_run(exp).info.run_id
    keys = ["train_loss", "train_acc", "val_loss", "val_acc"]
    now = int(time.time() * 1000)
    started = time.perf_counter()
    put_s = 0.0
    for step in range(points_per_site // len(keys)):
        for k in range(k_sites):
            t = time.perf_counter()
            for key in keys:
                queue.put(("metric", f"site-{k}", key, 0.5, now, step))
            put_s += time.perf_counter() - t
    queue.drain(600)
    elapsed = time.perf_counter() - started
    lost = sum(queue.close(5).values())
    total = k_sites * (points_per_site // len(keys)) * len(keys)
    stored = sum(
        len(client.get_metric_history(queue.run_ids[f"site-{k}"], key)) for k in range(k_sites) for key in keys
    )
    return {
        "points": total,
        "stored": stored,
        "lost": lost,
        "seconds": elapsed,
        "points_per_s": total / elapsed,
        "producer_us_per_point": put_s / total * 1e6,
    }


def nvflare_receiver_write_path(db_uri, k_sites, points_per_site):
    """FLARE's own MLflowReceiver fed the same stream directly, for comparison (its buffer, its flush)."""
    from mlflow.tracking import MlflowClient
    from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType, LogWriterName
    from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

    receiver = MLflowReceiver(tracking_uri=db_uri, kw_args={"experiment_name": f"flare-{time.time_ns()}"})
    client = MlflowClient(db_uri)
    exp = client.create_experiment(receiver.kw_args["experiment_name"])
    receiver.experiment_id = exp
    sites = [f"site-{k}" for k in range(k_sites)]
    for s in sites:
        receiver.mlflow_clients[s] = client
        receiver.run_ids[s] = client.create_run(exp).info.run_id
        receiver.buffer[s] = {
            t: [] for t in (AnalyticsDataType.METRICS, AnalyticsDataType.PARAMETERS, AnalyticsDataType.TAGS)
        }
    receiver.time_start = time.time()
    keys = ["train_loss", "train_acc", "val_loss", "val_acc"]
    started = time.perf_counter()
    for step in range(points_per_site // len(keys)):
        for s in sites:
            data = AnalyticsData(
                key="m",
                value={k: 0.5 for k in keys},
                data_type=AnalyticsDataType.METRICS,
                sender=LogWriterName.MLFLOW,
                global_step=step,
            )
            receiver.buffer_data(data, s)
            if time.time() - receiver.time_start >= 1:
                for site in sites:
                    receiver.flush_buffer(site)
                receiver.time_start = time.time()
    for site in sites:
        receiver.flush_buffer(site)
    elapsed = time.perf_counter() - started
    total = k_sites * (points_per_site // len(keys)) * len(keys)
    return {"points": total, "seconds": elapsed, "points_per_s": total / elapsed}


# ----- plots ---------------------------------------------------------------------------------------
def plots(results, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = results["federated"]["tracking_on"]
    curves = main.get("global_acc_per_round", {})
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, values in sorted(curves.items()):
            mean = key == "global_val_acc"
            ax.plot(
                range(len(values)),
                values,
                marker="o",
                lw=2.5 if mean else 1,
                alpha=1 if mean else 0.6,
                label="weighted mean" if mean else key.split("/")[-1],
            )
        ax.set(
            xlabel="round",
            ylabel="validation accuracy of the received global model",
            title="Global model per round (IID)",
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "global_accuracy.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ref = results["reference"]["compute_s"]
    rows = [("plain Lightning", [("compute", ref)])]
    for label, key in (("FLARE, tracking on", "tracking_on"), ("FLARE, tracking off", "tracking_off")):
        r = results["federated"][key]
        rows.append((label, [("start-up", r["startup_s"]), ("rounds", r["rounds_s"]), ("shutdown", r["shutdown_s"])]))
    colors = {"compute": "#4c72b0", "start-up": "#c44e52", "rounds": "#55a868", "shutdown": "#8172b2"}
    for y, (_, parts) in enumerate(rows):
        left = 0
        for part, seconds in parts:
            ax.barh(y, seconds, left=left, color=colors[part], label=part if y < 2 or part == "compute" else None)
            left += seconds
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlabel("seconds")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=False))
    ax.legend(uniq.values(), uniq.keys(), loc="lower right")
    ax.set_title("Where the time goes")
    fig.tight_layout()
    fig.savefig(out / "wall_time_breakdown.png", dpi=110)
    plt.close(fig)

    scaling = results.get("scaling", {})
    if scaling:
        fig, axes = plt.subplots(1, len(scaling), figsize=(4.2 * len(scaling), 3.4))
        axes = np.atleast_1d(axes)
        for ax, (axis, points) in zip(axes, scaling.items(), strict=False):
            xs = [p["x"] for p in points]
            ax.plot(xs, [p["wall_s"] for p in points], marker="o", label="wall")
            ax.plot(xs, [p["rounds_s"] for p in points], marker="o", label="rounds")
            ax.plot(xs, [p["reference_s"] for p in points], marker="o", label="plain Lightning")
            ax.set(xlabel=axis, ylabel="seconds", title=f"scaling with {axis}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=110)
        plt.close(fig)


# ----- main ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small workloads: a few minutes")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<time>)")
    p.add_argument("--skip-scaling", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out or REPO / "benchmarks" / "results" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    cfg = (
        {"sites": 2, "rounds": 3, "epochs": 1, "train_size": 6000}
        if a.quick
        else {"sites": 2, "rounds": 8, "epochs": 1, "train_size": 30000}
    )
    results = {"config": cfg, "machine": machine()}
    say(f"benchmarks {'quick' if a.quick else 'full'} -> {out}; {cfg}")

    data = make_data(work / "data-iid", cfg["train_size"], cfg["sites"])
    say("1/5 reference: plain Lightning, sites one after another")
    results["reference"] = reference(data, cfg["sites"], cfg["rounds"], cfg["epochs"])
    say(f"    compute {results['reference']['compute_s']:.1f} s")
    results["centralized"] = centralized(data, cfg["sites"], cfg["rounds"] * cfg["epochs"])
    say(f"    centralized test accuracy {results['centralized']['test_acc']:.4f}")

    say("2/5 federated: the job in the simulator, per-step metrics streamed (log every step)")
    results["federated"] = {}
    results["federated"]["tracking_on"] = federated(
        work, data, cfg["sites"], cfg["rounds"], cfg["epochs"], tracking=True, log_every=1, name="tracking-on"
    )
    say(f"    {fmt(results['federated']['tracking_on'])}")
    say("3/5 tracking off")
    results["federated"]["tracking_off"] = federated(
        work, data, cfg["sites"], cfg["rounds"], cfg["epochs"], tracking=False, name="tracking-off"
    )
    say(f"    {fmt(results['federated']['tracking_off'])}")
    dir_data = make_data(work / "data-dirichlet", cfg["train_size"], cfg["sites"], alpha=0.5)
    results["federated"]["dirichlet_0.5"] = federated(
        work, dir_data, cfg["sites"], cfg["rounds"], cfg["epochs"], name="dirichlet"
    )
    say(f"    Dirichlet 0.5: test accuracy {results['federated']['dirichlet_0.5']['test_acc']:.4f}")

    say("4/5 write path: the tracker's queue alone, synthetic stream")
    n = 20_000 if a.quick else 100_000
    results["write_path"] = {
        "sqlite": write_path(f"sqlite:///{work / 'write-path.db'}", 4, n // 4),
    }
    server = start_mlflow_server(work / "mlflow-server")
    try:
        results["write_path"]["mlflow_server"] = write_path(server.uri, 4, n // 4)
    finally:
        server.stop()
    for k, v in results["write_path"].items():
        say(f"    {k}: {v['points_per_s']:.0f} points/s" + (f", lost {v['lost']}" if "lost" in v else ""))

    if not a.skip_scaling:
        say("5/5 scaling")
        results["scaling"] = scaling(work, cfg, a.quick)
    results_file = out / "results.json"
    results_file.write_text(json.dumps(results, indent=2))
    plots(results, out)
    print()
    print(table(results))
    say(f"results: {results_file}; plots: {out}/*.png")
    return 0


def start_mlflow_server(folder):
    from flctl.mlflow_server import MlflowServer

    return MlflowServer(folder).start()


def scaling(work, cfg, quick):
    axes = {
        "sites": [(s, {"sites": s}) for s in ((2, 4) if quick else (2, 4, 8))],
        "rounds": [(r, {"rounds": r}) for r in ((2, 4) if quick else (2, 4, 8))],
        "train size": [(t, {"train_size": t}) for t in ((3000, 6000) if quick else (6000, 12000, 24000))],
    }
    out = {}
    base = {"sites": 2, "rounds": 2, "epochs": 1, "train_size": 6000}
    for axis, points in axes.items():
        out[axis] = []
        for x, change in points:
            c = {**base, **change}
            data = make_data(work / f"scale-data-{c['train_size']}-{c['sites']}", c["train_size"], c["sites"])
            ref = reference(data, c["sites"], c["rounds"], c["epochs"])["compute_s"]
            fed = federated(
                work, data, c["sites"], c["rounds"], c["epochs"], name=f"scale-{axis}-{x}".replace(" ", "_")
            )
            out[axis].append(
                {
                    "x": x,
                    "reference_s": ref,
                    **{k: fed[k] for k in ("wall_s", "startup_s", "rounds_s", "shutdown_s", "test_acc")},
                }
            )
            say(f"    {axis}={x}: wall {fed['wall_s']:.1f} s, rounds {fed['rounds_s']:.1f} s, reference {ref:.1f} s")
    return out


def fmt(r):
    return (
        f"wall {r['wall_s']:.1f} s = start-up {r['startup_s']:.1f} + rounds {r['rounds_s']:.1f} + "
        f"shutdown {r['shutdown_s']:.1f}; test accuracy {r['test_acc']:.4f}"
    )


def machine():
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.is_available(),
    }


def table(r):
    ref = r["reference"]["compute_s"]
    on, off = r["federated"]["tracking_on"], r["federated"]["tracking_off"]
    wp = r["write_path"]
    rows = [
        ("reference compute (plain Lightning, sites in turn)", f"{ref:.1f} s", ""),
        ("federated wall time (tracking on)", f"{on['wall_s']:.1f} s", f"{on['wall_s'] / ref:.2f} x reference"),
        ("  FLARE start-up / shutdown (fixed)", f"{on['startup_s']:.1f} s / {on['shutdown_s']:.1f} s", ""),
        (
            "  rounds (first train to last aggregation)",
            f"{on['rounds_s']:.1f} s",
            f"{on['rounds_s'] / ref:.2f} x reference  [target <= 1.3]",
        ),
        ("  sites' fit time, summed", f"{on['site_fit_s']:.1f} s", ""),
        (
            "tracking on / off (rounds, per-step metrics)",
            f"{on['rounds_s']:.1f} / {off['rounds_s']:.1f} s",
            f"{on['rounds_s'] / off['rounds_s']:.3f}  [target <= 1.05]",
        ),
        (
            "  metric points streamed / lost",
            f"{on.get('tracked_points', 0)} / {on.get('lost', 0)}",
            f"slowest event {on.get('max_event_ms', 0):.1f} ms",
        ),
        (
            "write path into SQLite",
            f"{wp['sqlite']['points_per_s']:.0f} points/s",
            f"lost {wp['sqlite']['lost']}  [target >= 20000]",
        ),
        (
            "write path into a local mlflow server",
            f"{wp['mlflow_server']['points_per_s']:.0f} points/s",
            f"lost {wp['mlflow_server']['lost']}",
        ),
        (
            "test accuracy: FedAvg IID / centralized",
            f"{on['test_acc']:.4f} / {r['centralized']['test_acc']:.4f}",
            f"{(on['test_acc'] - r['centralized']['test_acc']) * 100:+.1f} points  [target within 2]",
        ),
        ("test accuracy: FedAvg Dirichlet alpha=0.5", f"{r['federated']['dirichlet_0.5']['test_acc']:.4f}", ""),
    ]
    width = max(len(a) for a, _, _ in rows)
    return "\n".join(f"{a:<{width}}  {b:>22}  {c}" for a, b, c in rows)


if __name__ == "__main__":
    sys.exit(main())
