"""Accuracy on skewed sites: FedAvg, FedProx, SCAFFOLD and FedOpt x IID / Dirichlet 0.5 / 0.1 x seeds.

Every cell is the real job folder (jobs/hello-lightning-<algorithm>) in the FLARE simulator on
the hard offline set, tracked into one MLflow experiment so the runs sit side by side in the UI
(parent runs tagged bench.algorithm / bench.split / bench.seed, with the final global model's
test accuracy as `bench_test_acc`). The seed sets both the split and the global model's
initialization. Centralized training on the union of the sites' training data, for the same
total epochs, stands beside them; its learning rate is tuned on the sites' validation data
(never the test set) over a grid that contains the sites' own lr.
"""

import json
import time
from pathlib import Path

import numpy as np
from bench_common import federated, make_data, quiet_trainer, say, spread

from flctl.data_prep import HARD_DIFFICULTY as HARD

ALGORITHMS = {
    "FedAvg": "hello-lightning-mlflow",
    "FedProx": "hello-lightning-fedprox",
    "SCAFFOLD": "hello-lightning-scaffold",
    "FedOpt": "hello-lightning-fedopt",
}
SPLITS = {"iid": None, "dirichlet_0.5": 0.5, "dirichlet_0.1": 0.1}
EXPERIMENT = "benchmark-accuracy"
LR_GRID = (0.005, 0.01, 0.02, 0.05)


def settings(quick: bool) -> dict:
    if quick:
        return {
            "sites": 3,
            "rounds": 2,
            "epochs": 1,
            "train_size": 3000,
            "test_size": 1000,
            "seeds": [0],
            "splits": ["dirichlet_0.1"],
            "lr_grid": [0.02],
        }
    return {
        "sites": 3,
        "rounds": 4,
        "epochs": 1,
        "train_size": 6000,
        "test_size": 2000,
        "seeds": [0, 1, 2],
        "splits": list(SPLITS),
        "lr_grid": list(LR_GRID),
    }


def run(work: Path, quick: bool, results: dict, save) -> dict:
    """Fills results (resumable: cells already in it are kept); save() is called after every cell."""
    cfg = results.setdefault("config", settings(quick))
    cfg["difficulty"] = HARD
    cells = results.setdefault("cells", {})
    data = work / "accuracy-data"
    uri = f"sqlite:///{work / 'accuracy-mlflow.db'}"
    results["tracking_uri"] = uri
    results["experiment"] = EXPERIMENT
    total = len(cfg["seeds"]) * len(cfg["splits"]) * len(ALGORITHMS)
    done = 0
    for seed in cfg["seeds"]:
        for split in cfg["splits"]:
            make_data(data, cfg["train_size"], cfg["sites"], SPLITS[split], seed, cfg["test_size"], difficulty=HARD)
            for algorithm, job in ALGORITHMS.items():
                done += 1
                key = f"{algorithm}/{split}/{seed}"
                if key in cells:
                    continue
                fed = federated(
                    work,
                    data,
                    cfg["sites"],
                    cfg["rounds"],
                    cfg["epochs"],
                    name=f"acc-{algorithm}-{split}-{seed}",
                    job=job,
                    extra={"server.seed": seed},
                    tracking_uri=uri,
                    experiment=EXPERIMENT,
                )
                tag_parent(uri, fed.get("parent_run_id"), algorithm, split, seed, fed["test_acc"])
                cells[key] = {k: fed[k] for k in ("test_acc", "wall_s", "rounds_s", "lost") if k in fed}
                say(f"    [{done}/{total}] {key}: test accuracy {fed['test_acc']:.4f} ({fed['wall_s']:.0f} s)")
                save()
    central = results.setdefault("central", {})
    central_runs(data, cfg, central, uri, save)
    results["summary"] = summary(results)
    save()
    return results


def tag_parent(uri, run_id, algorithm, split, seed, test_acc):
    from mlflow.tracking import MlflowClient

    if not run_id:
        return
    client = MlflowClient(uri)
    for key, value in (("bench.algorithm", algorithm), ("bench.split", split), ("bench.seed", seed)):
        client.set_tag(run_id, key, str(value))
    client.log_metric(run_id, "bench_test_acc", test_acc)


def central_runs(data, cfg, central: dict, uri, save):
    """Tune the lr on seed 0 of the IID split (validation accuracy), then every seed at that lr."""
    epochs = cfg["rounds"] * cfg["epochs"]
    tuning = central.setdefault("tuning", {})
    for lr in cfg["lr_grid"]:
        if str(lr) in tuning:
            continue
        make_data(data, cfg["train_size"], cfg["sites"], None, 0, cfg["test_size"])
        tuning[str(lr)] = train_central(data, cfg["sites"], epochs, lr, seed=0, uri=uri, purpose="tuning")
        say(f"    central lr {lr}: validation accuracy {tuning[str(lr)]['val_acc']:.4f}")
        save()
    best = max(tuning, key=lambda lr: tuning[lr]["val_acc"])
    central["lr"] = float(best)
    runs = central.setdefault("runs", {})
    for seed in cfg["seeds"]:
        if str(seed) in runs:
            continue
        make_data(data, cfg["train_size"], cfg["sites"], None, seed, cfg["test_size"])
        runs[str(seed)] = train_central(data, cfg["sites"], epochs, float(best), seed=seed, uri=uri, purpose="result")
        say(f"    central seed {seed} (lr {best}): test accuracy {runs[str(seed)]['test_acc']:.4f}")
        save()


def train_central(data_root, sites, epochs, lr, seed, uri, purpose) -> dict:
    """Lightning on the union of the sites' training shares, the job's CNN and optimizer."""
    import pytorch_lightning as pl
    import torch
    from bench_common import global_test_accuracy
    from mlflow.tracking import MlflowClient
    from torch.utils.data import DataLoader

    from cifar10_example.data import read_train_set, split_path, tensor_dataset
    from cifar10_example.lit_module import LitCifarNet
    from cifar10_example.network import CifarNet

    images, labels = read_train_set(data_root)
    splits = [json.loads(split_path(data_root, f"site-{i}").read_text()) for i in range(1, sites + 1)]
    train_idx = np.concatenate([s["train"] for s in splits])
    val_idx = np.concatenate([s["val"] for s in splits])
    pl.seed_everything(seed, verbose=False)
    model = LitCifarNet(lr=lr)
    model.load_state_dict(CifarNet(init_seed=seed).state_dict())  # as the job's persistor starts
    started = time.perf_counter()
    loader = DataLoader(tensor_dataset(images[train_idx], labels[train_idx]), batch_size=32, shuffle=True)
    quiet_trainer(max_epochs=epochs).fit(model, loader)
    seconds = time.perf_counter() - started
    net = model.eval()
    with torch.no_grad():
        val = tensor_dataset(images[val_idx], labels[val_idx])
        xs, ys = val.tensors
        val_acc = float((net(xs).argmax(1) == ys).float().mean())
    test_acc, _ = global_test_accuracy(net, data_root)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT) or client.get_experiment(client.create_experiment(EXPERIMENT))
    run = client.create_run(
        exp.experiment_id,
        run_name=f"central-{purpose}-lr{lr}-seed{seed}",
        tags={"bench.algorithm": "central", "bench.split": "union", "bench.seed": str(seed), "role": "central"},
    )
    rid = run.info.run_id
    for key, value in (("lr", lr), ("epochs", epochs), ("purpose", purpose), ("train_samples", len(train_idx))):
        client.log_param(rid, key, value)
    client.log_metric(rid, "val_acc", val_acc)
    client.log_metric(rid, "bench_test_acc", test_acc)
    client.set_terminated(rid)
    return {"val_acc": val_acc, "test_acc": test_acc, "seconds": seconds, "lr": lr, "seed": seed}


def summary(results) -> dict:
    """mean and spread per algorithm and split, and the central figure beside them."""
    cfg, cells = results["config"], results["cells"]
    out = {}
    for algorithm in ALGORITHMS:
        for split in cfg["splits"]:
            accs = [
                cells[f"{algorithm}/{split}/{s}"]["test_acc"]
                for s in cfg["seeds"]
                if f"{algorithm}/{split}/{s}" in cells
            ]
            if accs:
                out[f"{algorithm}/{split}"] = spread(accs)
    for algorithm in list(ALGORITHMS)[1:]:  # paired by seed against FedAvg: same split, same start
        for split in cfg["splits"]:
            pairs = [
                (cells[f"{algorithm}/{split}/{s}"]["test_acc"], cells[f"FedAvg/{split}/{s}"]["test_acc"])
                for s in cfg["seeds"]
                if f"{algorithm}/{split}/{s}" in cells and f"FedAvg/{split}/{s}" in cells
            ]
            if pairs:
                diff = spread([a - b for a, b in pairs])
                diff["wins"] = sum(a > b for a, b in pairs)
                out[f"{algorithm}-FedAvg/{split}"] = diff
    runs = results.get("central", {}).get("runs", {})
    if runs:
        out["central"] = spread([r["test_acc"] for r in runs.values()])
    return out


def table(results) -> str:
    cfg, summ = results["config"], results["summary"]
    head = "| algorithm | " + " | ".join(cfg["splits"]) + " |"
    rows = [head, "| --- |" + " --- |" * len(cfg["splits"])]
    for algorithm in ALGORITHMS:
        cells = []
        for split in cfg["splits"]:
            s = summ.get(f"{algorithm}/{split}")
            cells.append("-" if s is None else f"{s['mean']:.3f} ± {s['stdev']:.3f} ({s['min']:.3f}-{s['max']:.3f})")
        rows.append(f"| {algorithm} | " + " | ".join(cells) + " |")
    c = summ.get("central")
    if c:
        lr = results["central"]["lr"]
        text = f"{c['mean']:.3f} ± {c['stdev']:.3f} ({c['min']:.3f}-{c['max']:.3f}), lr {lr}"
        rows.append("| centralized (same total epochs) | " + " | ".join([text] * len(cfg["splits"])) + " |")
    rows += ["", "Against FedAvg, paired by seed (mean difference in points; seeds where it is ahead):", ""]
    rows += ["| algorithm | " + " | ".join(cfg["splits"]) + " |", "| --- |" + " --- |" * len(cfg["splits"])]
    for algorithm in list(ALGORITHMS)[1:]:
        cells = []
        for split in cfg["splits"]:
            d = summ.get(f"{algorithm}-FedAvg/{split}")
            cells.append("-" if d is None else f"{d['mean'] * 100:+.1f} ({d['wins']} of {d['n']})")
        rows.append(f"| {algorithm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, summ = results["config"], results["summary"]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(ALGORITHMS)
    for i, algorithm in enumerate(ALGORITHMS):
        xs, means, errs = [], [], []
        for j, split in enumerate(cfg["splits"]):
            s = summ.get(f"{algorithm}/{split}")
            if s:
                xs.append(j + (i - (len(ALGORITHMS) - 1) / 2) * width)
                means.append(s["mean"])
                errs.append([[s["mean"] - s["min"]], [s["max"] - s["mean"]]])
        if xs:
            yerr = np.array(errs).reshape(len(xs), 2).T
            ax.bar(xs, means, width, yerr=yerr, capsize=3, label=algorithm)
    c = summ.get("central")
    if c:
        ax.axhline(c["mean"], color="black", ls="--", lw=1, label=f"centralized ({c['mean']:.3f})")
    ax.set_xticks(range(len(cfg["splits"])), cfg["splits"])
    ax.set_ylabel("global model test accuracy")
    ax.set_title(f"{cfg['sites']} sites, {cfg['rounds']} rounds; mean of {len(cfg['seeds'])} seed(s), bars: min-max")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
