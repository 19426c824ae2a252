#!/usr/bin/env python3
"""Calibrate the offline data set's difficulty knob: central accuracy of the job's CNN per difficulty,
and FedAvg on an IID against a Dirichlet split.

    PYTHONPATH=custom python benchmarks/calibrate_difficulty.py [--difficulties 0 0.3 0.5 0.7 1]
        [--epochs 4] [--fedavg 0 0.5] [--sites 3] [--alpha 0.1] [--split-seeds 0 1] [--out FILE]

For each difficulty the set is generated (default sizes, seed 1234) in a temporary folder and
CifarNet is trained on all of it in a plain torch loop as a site trains it (SGD lr 0.02, momentum
0.9, batch 32, the data normalized as the sites normalize it), on one CPU thread. For each
difficulty in --fedavg, FedAvg over --sites sites runs as many rounds of one local epoch as the
central run has epochs (so every sample is seen as often), on an IID split and on a
Dirichlet(--alpha) split, once per split seed; the global model is the average of the sites'
weights by their sample counts. Test accuracy is on the whole test batch. A central run takes
about 30 s on one core. Writes JSON to --out (default
benchmarks/results/difficulty_calibration.json) and prints a table (FedAvg: the mean over the
split seeds).

Measured (defaults; torch 2.14 on one CPU thread, about 25-40 s a run): central test accuracy
0.977 at difficulty 0, 0.940 at 0.1, 0.836 at 0.3, 0.770 at 0.4, 0.742 at 0.5, 0.623 at 0.6,
0.528 at 0.7, 0.426 at 0.85, 0.280 at 1. FedAvg, 3 sites, 4 rounds of 1 epoch, mean of split
seeds 0 and 1: difficulty 0, IID 0.983, Dirichlet(0.1) 0.956; difficulty 0.5, IID 0.642,
Dirichlet(0.1) 0.479. Hence data_prep.HARD_DIFFICULTY = 0.5.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifar10_example.data import read_test_set, read_train_set, to_tensor
from cifar10_example.network import CifarNet
from flctl import data_prep

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "difficulty_calibration.json"
LR, MOMENTUM, BATCH = 0.02, 0.9, 32


def load(difficulty: float, train_size: int, test_size: int, seed: int):
    with tempfile.TemporaryDirectory() as tmp:
        data_prep.generate_offline(tmp, train_size, test_size, seed, difficulty)
        images, labels = read_train_set(tmp)
        test_images, test_labels = read_test_set(tmp)
    return to_tensor(images), torch.from_numpy(labels), to_tensor(test_images), torch.from_numpy(test_labels)


def train_epochs(model, x, y, epochs: int, generator) -> float:
    """SGD as the job's sites use it (a fresh optimizer, as each round of a site has); mean loss of the last epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        total, order = 0.0, torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), BATCH):
            idx = order[start : start + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
    return total / len(y)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    hits = sum((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum().item() for i in range(0, len(y), 500))
    return hits / len(y)


def central(data, epochs: int) -> dict:
    x, y, tx, ty = data
    started = time.perf_counter()
    model = CifarNet(init_seed=0)
    loss = train_epochs(model, x, y, epochs, torch.Generator().manual_seed(0))
    return {
        "test_accuracy": round(accuracy(model, tx, ty), 4),
        "train_accuracy": round(accuracy(model, x, y), 4),
        "last_epoch_loss": round(loss, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def fedavg(data, parts, rounds: int) -> dict:
    x, y, tx, ty = data
    started = time.perf_counter()
    global_model = CifarNet(init_seed=0)
    generator = torch.Generator().manual_seed(0)
    per_round = []
    for _ in range(rounds):
        states, weights = [], []
        for part in parts:
            idx = torch.from_numpy(part)
            local = CifarNet()
            local.load_state_dict(global_model.state_dict())
            train_epochs(local, x[idx], y[idx], 1, generator)
            states.append(local.state_dict())
            weights.append(len(part))
        w = torch.tensor(weights, dtype=torch.float32) / sum(weights)
        global_model.load_state_dict({k: sum(wi * s[k] for wi, s in zip(w, states, strict=True)) for k in states[0]})
        per_round.append(round(accuracy(global_model, tx, ty), 4))
    return {
        "test_accuracy": per_round[-1],
        "per_round": per_round,
        "sizes": [len(p) for p in parts],
        "label_skew": round(data_prep.label_skew(y.numpy(), parts), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--difficulties", type=data_prep.difficulty_arg, nargs="+", default=[0, 0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1]
    )
    p.add_argument("--fedavg", type=data_prep.difficulty_arg, nargs="*", default=[0, data_prep.HARD_DIFFICULTY])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--train-size", type=int, default=6000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1234, help="data seed (generate_offline's default)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    results = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "settings": {
            "model": "CifarNet(init_seed=0)",
            "optimizer": f"SGD lr {LR} momentum {MOMENTUM}",
            "batch_size": BATCH,
            "epochs": args.epochs,
            "train_size": args.train_size,
            "test_size": args.test_size,
            "data_seed": args.seed,
            "fedavg": {
                "sites": args.sites,
                "alpha": args.alpha,
                "rounds": args.epochs,
                "local_epochs": 1,
                "split_seeds": args.split_seeds,
            },
        },
        "hard_difficulty": data_prep.HARD_DIFFICULTY,
        "central": {},
        "fedavg": {},
    }
    dirichlet = f"dirichlet_{args.alpha}"
    table = []
    for d in sorted(set(args.difficulties) | set(args.fedavg)):
        data = load(d, args.train_size, args.test_size, args.seed)
        row = {"difficulty": d, "central": None, "iid": None, dirichlet: None}
        if d in args.difficulties:
            results["central"][str(d)] = run = central(data, args.epochs)
            row["central"] = run["test_accuracy"]
            print(f"difficulty {d:<5} central: test accuracy {row['central']:.3f} ({run['seconds']} s)", flush=True)
        if d in args.fedavg:
            labels = data[1].numpy()
            runs = results["fedavg"][str(d)] = {"iid": {}, dirichlet: {}}
            for seed in args.split_seeds:
                rng = np.random.default_rng(seed)
                runs["iid"][str(seed)] = fedavg(data, data_prep.iid_split(len(labels), args.sites, rng), args.epochs)
                rng = np.random.default_rng(seed)
                parts = data_prep.dirichlet_split(labels, args.sites, args.alpha, rng)
                runs[dirichlet][str(seed)] = fedavg(data, parts, args.epochs)
                line = ", ".join(f"{k} {v[str(seed)]['test_accuracy']:.3f}" for k, v in runs.items())
                print(f"difficulty {d:<5} FedAvg {args.sites} sites, split seed {seed}: {line}", flush=True)
            for k, v in runs.items():
                row[k] = round(float(np.mean([r["test_accuracy"] for r in v.values()])), 4)
                v["mean_test_accuracy"] = row[k]
        table.append(row)
    results["table"] = table

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'difficulty':>10} {'central':>8} {'FedAvg IID':>11} {'FedAvg a=' + str(args.alpha):>14}")
    for row in table:
        cells = [row["central"], row["iid"], row[dirichlet]]
        text = [f"{'-' if v is None else f'{v:.3f}':>{w}}" for v, w in zip(cells, (8, 11, 14), strict=True)]
        print(f"{row['difficulty']:>10} " + " ".join(text))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
