"""The CIFAR-10 example's data: CIFAR-10's on-disk layout, per-site split files, the DataModule.

The same reader serves the real CIFAR-10 download and the offline dataset that
`flctl prepare-data --offline` generates. torchvision's CIFAR10 class is not used for reading because it
checks the MD5 sums of the original files and would reject the offline set.

Layout under a data root:
    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch   pickled dicts
        {"data": uint8 array (N, 3072), "labels": list of int}
    splits/<site>.json    {"site": ..., "train": [indices], "val": [indices]}
                          indices into the concatenated training batches
    splits/split_info.json  how the split was made (sites, alpha, seed)
"""

import json
import pickle
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
SPLITS_DIR = "splits"
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
# CIFAR-10's channel statistics; the offline set is generated to roughly match them.
MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)


class SiteDataError(ValueError):
    """Bad or missing site data; the message is one line naming the site and the path."""

    def __init__(self, site: str, problem: str, path):
        super().__init__(f"site {site}: {problem}: {path}")


def batches_dir(data_root) -> Path:
    return Path(data_root) / BATCHES_DIR


def split_path(data_root, site: str) -> Path:
    return Path(data_root) / SPLITS_DIR / f"{site}.json"


def read_batch(path: Path, site: str = "-"):
    """Read one pickled batch; returns (uint8 images N x 3 x 32 x 32, int64 labels N)."""
    if not path.is_file():
        raise SiteDataError(site, "missing data file", path)
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except Exception as e:  # truncated, corrupt or not a pickle at all
        raise SiteDataError(site, f"unreadable data file ({type(e).__name__}: {e})", path) from None
    n_values = int(np.prod(IMAGE_SHAPE))
    if data.ndim != 2 or data.shape[1] != n_values:
        raise SiteDataError(site, f"images have shape {data.shape}, expected (N, {n_values})", path)
    if labels.shape != (data.shape[0],):
        raise SiteDataError(site, f"{labels.shape[0]} labels for {data.shape[0]} images", path)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise SiteDataError(site, f"labels outside 0..{NUM_CLASSES - 1}", path)
    return data.reshape(-1, *IMAGE_SHAPE), labels


def read_train_set(data_root, site: str = "-"):
    """Concatenate the training batches present (CIFAR-10 has five; the offline set may have fewer)."""
    folder = batches_dir(data_root)
    if not Path(data_root).is_dir():
        raise SiteDataError(site, "missing data folder", Path(data_root))
    if not folder.is_dir():
        raise SiteDataError(site, "missing CIFAR-10 batches folder (run scripts/prepare_data.sh)", folder)
    files = [folder / name for name in TRAIN_BATCHES if (folder / name).exists()]
    if not files:
        raise SiteDataError(site, "no training batches (data_batch_*) in", folder)
    parts = [read_batch(f, site) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_test_set(data_root, site: str = "-"):
    return read_batch(batches_dir(data_root) / TEST_BATCH, site)


def read_site_split(data_root, site: str, num_train: int) -> dict:
    """Load and check a site's split file: train/val index lists into the training set."""
    path = split_path(data_root, site)
    if not path.is_file():
        raise SiteDataError(site, "missing split file (run scripts/prepare_data.sh with enough sites)", path)
    try:
        split = json.loads(path.read_text())
        train = np.asarray(split["train"], dtype=np.int64)
        val = np.asarray(split.get("val", []), dtype=np.int64)
    except Exception as e:
        raise SiteDataError(site, f"unreadable split file ({type(e).__name__}: {e})", path) from None
    if train.size == 0:
        raise SiteDataError(site, "empty split (no training samples)", path)
    for name, idx in (("train", train), ("val", val)):
        if idx.size and (idx.min() < 0 or idx.max() >= num_train):
            raise SiteDataError(site, f"{name} indices outside 0..{num_train - 1}", path)
    return {"train": train, "val": val}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x 3 x 32 x 32 -> normalized float32, done once up front rather than per item."""
    x = images.astype(np.float32) / 255.0
    return torch.from_numpy((x - MEAN) / STD)


def tensor_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(to_tensor(images), torch.from_numpy(labels))


def split_info(data_root) -> dict:
    """How the sites' shares were made (prepare_data's split_info.json), as hyperparameters."""
    try:
        info = json.loads((Path(data_root) / SPLITS_DIR / "split_info.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"split": info.get("split"), "alpha": info.get("alpha"), "split_seed": info.get("seed")}


class CifarDataModule(pl.LightningDataModule):
    """One site's share of the data: its train and validation parts, plus the common test set.

    site: filled in by the engine (the constructor takes it). Its hyperparameters (batch_size and
    how the split was made) reach MLflow as the site run's params."""

    def __init__(self, data_root: str, site: str = "site-1", batch_size: int = 32, num_workers: int = 0):
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"CifarDataModule: {name} must be an integer >= {low}, got {value!r}")
        self.save_hyperparameters({"batch_size": batch_size, **split_info(data_root)})
        self.data_root = str(data_root)
        self.site = site
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set = self.val_set = self.test_set = None

    def load(self):
        """Read and check everything once; raises SiteDataError with one clear line."""
        if self.train_set is not None:
            return
        images, labels = read_train_set(self.data_root, self.site)
        split = read_site_split(self.data_root, self.site, len(labels))
        self.train_set = tensor_dataset(images[split["train"]], labels[split["train"]])
        val = split["val"] if split["val"].size else split["train"]
        self.val_set = tensor_dataset(images[val], labels[val])

    def setup(self, stage: str):
        self.load()
        if stage == "test" and self.test_set is None:
            self.test_set = tensor_dataset(*read_test_set(self.data_root, self.site))

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.test_set, shuffle=False)
