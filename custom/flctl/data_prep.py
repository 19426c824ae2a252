"""Data preparation, run once before a job: fetch CIFAR-10 (or generate an offline stand-in)
and write one split file per site.

    python custom/data_prep.py --data-root DIR --sites 2 [--alpha 0.5] [--seed 0] [--offline]

Splits are IID by default; with --alpha, each class is spread over the sites with
Dirichlet(alpha) proportions (smaller alpha, more skew). Same seed, same split.
"""

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np

from fl_lightning_mlflow.site.data import (
    BATCHES_DIR,
    NUM_CLASSES,
    SPLITS_DIR,
    TEST_BATCH,
    TRAIN_BATCHES,
    batches_dir,
    read_train_set,
)

OFFLINE_MARKER = "OFFLINE_SYNTHETIC_DATA"
NOISE = 0.5  # pixel noise of the offline set: high enough that a few epochs do not saturate it


def iid_split(num_samples: int, num_sites: int, rng: np.random.Generator) -> list:
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_sites)]


def dirichlet_split(labels: np.ndarray, num_sites: int, alpha: float, rng, min_size: int = 10) -> list:
    """Spread each class over the sites with Dirichlet(alpha) proportions.

    Redraws until every site has at least min_size samples, so no site ends up empty.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    min_size = min(min_size, len(labels) // num_sites)
    for _ in range(1000):
        parts = [[] for _ in range(num_sites)]
        for c in range(NUM_CLASSES):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_sites, alpha))) * len(idx)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not give every one of {num_sites} sites {min_size} samples with alpha={alpha}")


def label_skew(labels: np.ndarray, parts: list) -> float:
    """Mean total-variation distance between each site's label mix and the overall mix (0 = IID)."""
    overall = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=NUM_CLASSES) / len(p) - overall).sum() for p in parts]
    return float(np.mean(tv))


def write_splits(data_root, labels, num_sites, alpha, seed, val_fraction) -> dict:
    """Write splits/site-<i>.json for i = 1..num_sites (replacing any earlier split)."""
    if num_sites < 1:
        raise ValueError(f"sites must be >= 1, got {num_sites}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    if alpha is None:
        parts = iid_split(len(labels), num_sites, rng)
    else:
        parts = dirichlet_split(labels, num_sites, alpha, rng)
    out = Path(data_root) / SPLITS_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("site-*.json"):
        old.unlink()
    counts = {}
    for i, part in enumerate(parts, start=1):
        shuffled = rng.permutation(part)
        n_val = int(round(len(part) * val_fraction)) if len(part) > 1 else 0
        site = f"site-{i}"
        entry = {"site": site, "train": sorted(shuffled[n_val:].tolist()), "val": sorted(shuffled[:n_val].tolist())}
        (out / f"{site}.json").write_text(json.dumps(entry))
        counts[site] = {"train": len(entry["train"]), "val": len(entry["val"])}
    info = {
        "sites": num_sites,
        "split": "iid" if alpha is None else "dirichlet",
        "alpha": alpha,
        "seed": seed,
        "val_fraction": val_fraction,
        "label_skew": round(label_skew(labels, parts), 4),
        "counts": counts,
    }
    (out / "split_info.json").write_text(json.dumps(info, indent=2))
    return info


def generate_offline(data_root, train_size: int = 6000, test_size: int = 1000, seed: int = 1234) -> None:
    """Write a small learnable dataset in CIFAR-10's layout, for machines without internet.

    Each class is a fixed coarse colour pattern; samples add a random shift, contrast,
    brightness and pixel noise, so a small CNN learns it well but not trivially.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.35, 0.65, size=(NUM_CLASSES, 3, 4, 4))
    prototypes = prototypes.repeat(8, axis=2).repeat(8, axis=3)  # 4x4 blocks -> 32x32

    def sample(n):
        labels = rng.integers(0, NUM_CLASSES, size=n)
        images = prototypes[labels]
        shifts = rng.integers(-3, 4, size=n)
        for s in np.unique(shifts):  # horizontal shift per sample, grouped to stay vectorized
            images[shifts == s] = np.roll(images[shifts == s], s, axis=3)
        contrast = rng.uniform(0.6, 1.2, size=(n, 1, 1, 1))
        brightness = rng.uniform(-0.15, 0.15, size=(n, 1, 1, 1))
        images = (images - 0.5) * contrast + 0.5 + brightness + rng.normal(0, NOISE, size=images.shape)
        data = (np.clip(images, 0, 1) * 255).astype(np.uint8).reshape(n, -1)
        return data, labels

    folder = batches_dir(data_root)
    folder.mkdir(parents=True, exist_ok=True)
    per_batch = np.array_split(np.arange(train_size), len(TRAIN_BATCHES))
    for name, idx in zip(TRAIN_BATCHES, per_batch, strict=True):
        data, labels = sample(len(idx))
        _write_batch(folder / name, data, labels, name)
    data, labels = sample(test_size)
    _write_batch(folder / TEST_BATCH, data, labels, TEST_BATCH)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class_{c}" for c in range(NUM_CLASSES)]}, f)
    (Path(data_root) / OFFLINE_MARKER).write_text("generated by custom/data_prep.py; not CIFAR-10\n")


def _write_batch(path: Path, data, labels, batch_label: str) -> None:
    with open(path, "wb") as f:
        pickle.dump({"batch_label": batch_label, "data": data, "labels": [int(v) for v in labels]}, f)


def download_cifar10(data_root) -> None:
    """Fetch CIFAR-10 once with torchvision (it checks MD5 sums and skips a complete download)."""
    import torchvision

    torchvision.datasets.CIFAR10(root=str(data_root), train=True, download=True)
    torchvision.datasets.CIFAR10(root=str(data_root), train=False, download=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="shared data folder")
    p.add_argument("--sites", type=int, default=2, help="number of sites (default 2)")
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration; omit for IID")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each site kept for validation")
    p.add_argument("--offline", action="store_true", help="generate the offline dataset instead of downloading")
    p.add_argument("--offline-train-size", type=int, default=6000)
    p.add_argument("--offline-test-size", type=int, default=1000)
    a = p.parse_args(argv)
    root = Path(a.data_root)
    is_offline = (root / OFFLINE_MARKER).exists()
    has_batches = (root / BATCHES_DIR / TEST_BATCH).exists()
    try:
        if a.offline:
            if has_batches and not is_offline:
                raise ValueError(f"{root} holds real CIFAR-10; choose another --data-root for offline data")
            if not has_batches:
                sizes = f"{a.offline_train_size} train, {a.offline_test_size} test"
                print(f"generating offline dataset in {root} ({sizes})")
                generate_offline(root, a.offline_train_size, a.offline_test_size)
        else:
            if is_offline:
                raise ValueError(f"{root} holds the offline dataset; choose another --data-root for CIFAR-10")
            download_cifar10(root)
        _, labels = read_train_set(root)
        info = write_splits(root, labels, a.sites, a.alpha, a.seed, a.val_fraction)
    except ValueError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2
    print(f"wrote {info['split']} split for {a.sites} sites (label skew {info['label_skew']}) in {root / SPLITS_DIR}")
    for site, c in info["counts"].items():
        print(f"  {site}: {c['train']} train, {c['val']} val")
    return 0


if __name__ == "__main__":
    sys.exit(main())
