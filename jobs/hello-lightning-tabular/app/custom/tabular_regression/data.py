"""TabularDataModule: one site's synthetic regression data, generated on first use like a download.

    y = X @ w + 0.5 * sin(X[:, 0]) + noise

The true w is the same for every site (drawn from `seed`), so there is one model to learn; each
site's features are shifted by its own mean offset, so the sites' data differ (non-IID covariates).

Layout under data_root (files already there are used as they are, like a finished download):
    <site>.npz   x_train, y_train, x_val, y_val   (80/20 split of num_samples)
    test.npz     x, y   the shared held-out set (no offset)
x is float32 (N, num_features), y float32 (N, 1).
"""

import contextlib
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

TEST_FILE = "test.npz"
TRAIN_FRACTION = 0.8
NOISE_STD = 0.1


class TabularDataError(ValueError):
    """Missing or bad site data; the message is one line naming the site and the path."""

    def __init__(self, site: str, problem: str, path):
        super().__init__(f"site {site}: {problem}: {path}")


def site_key(site: str) -> int:
    # crc32, not hash(): Python salts str hashes per process, and every process (and every rerun)
    # must derive the same data for a site.
    return zlib.crc32(site.encode("utf-8"))


def true_weights(num_features: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=num_features)


def site_offset(site: str, num_features: int) -> np.ndarray:
    """The site's feature mean shift, from its name alone."""
    return np.random.default_rng(site_key(site)).uniform(-1.0, 1.0, size=num_features)


def make_samples(rng: np.random.Generator, n: int, w: np.ndarray, offset) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, w.size)) + offset
    y = x @ w + 0.5 * np.sin(x[:, 0]) + NOISE_STD * rng.normal(size=n)
    return x.astype(np.float32), y.astype(np.float32).reshape(-1, 1)


def generate_site(site: str, num_features: int, num_samples: int, seed: int) -> dict:
    # Streams [seed, 1, site] and [seed, 2] (test) never coincide with each other or with w's.
    rng = np.random.default_rng([seed, 1, site_key(site)])
    x, y = make_samples(rng, num_samples, true_weights(num_features, seed), site_offset(site, num_features))
    n_train = int(round(TRAIN_FRACTION * num_samples))
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_val": x[n_train:], "y_val": y[n_train:]}


def generate_test(num_features: int, num_samples: int, seed: int) -> dict:
    x, y = make_samples(np.random.default_rng([seed, 2]), num_samples, true_weights(num_features, seed), 0.0)
    return {"x": x, "y": y}


def save_atomic(path: Path, arrays: dict) -> None:
    """Write to a temp file in the same folder, then rename: several sites may prepare the same
    data_root at once (the simulator runs them in one machine), and a reader must never see a
    half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_arrays(path: Path, site: str, pairs: list[tuple[str, str]], num_features: int) -> dict:
    """Read and check (x, y) pairs of arrays; raises TabularDataError with one clear line."""
    if not path.is_file():
        raise TabularDataError(site, "missing data file (prepare_data generates it)", path)
    try:
        with np.load(path) as f:
            arrays = {k: np.asarray(f[k], dtype=np.float32) for pair in pairs for k in pair}
    except Exception as e:  # truncated, corrupt, not an .npz, or a key missing
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the library said
        raise TabularDataError(site, f"unreadable data file ({reason})", path) from None
    for xk, yk in pairs:
        x, y = arrays[xk], arrays[yk]
        if x.ndim != 2 or x.shape[1] != num_features or x.shape[0] == 0:
            raise TabularDataError(site, f"{xk} has shape {x.shape}, expected (N>0, {num_features})", path)
        if y.shape != (x.shape[0], 1):
            raise TabularDataError(site, f"{yk} has shape {y.shape}, expected ({x.shape[0]}, 1)", path)
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise TabularDataError(site, f"{xk} or {yk} holds NaN or inf", path)
    return arrays


def tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


class TabularDataModule(pl.LightningDataModule):
    """One site's train and validation data, plus the shared test set. The engine fills in `site`."""

    def __init__(
        self,
        data_root: str,
        site: str = "site-1",
        batch_size: int = 64,
        num_features: int = 8,
        num_samples: int = 600,
        seed: int = 0,
    ):
        super().__init__()
        if num_samples < 5:  # at least one validation sample after the 80/20 split
            raise ValueError(f"num_samples must be >= 5, got {num_samples}")
        # data_root is a host path and site is already a tag of the site's run; seed is left out
        # so it cannot clash with the engine's own "seed" param (MLflow params are write-once).
        self.save_hyperparameters(ignore=["data_root", "site", "seed"])
        self.data_root = Path(data_root)
        self.site = site
        self.batch_size = batch_size
        self.num_features = num_features
        self.num_samples = num_samples
        self.seed = seed
        self.train_set = self.val_set = self.test_set = None

    @property
    def site_file(self) -> Path:
        return self.data_root / f"{self.site}.npz"

    @property
    def test_file(self) -> Path:
        return self.data_root / TEST_FILE

    def prepare_data(self):
        if not self.site_file.exists():
            save_atomic(self.site_file, generate_site(self.site, self.num_features, self.num_samples, self.seed))
        if not self.test_file.exists():
            save_atomic(self.test_file, generate_test(self.num_features, self.num_samples, self.seed))

    def setup(self, stage: str | None = None):
        if self.train_set is None:
            pairs = [("x_train", "y_train"), ("x_val", "y_val")]
            a = load_arrays(self.site_file, self.site, pairs, self.num_features)
            self.train_set = tensor_dataset(a["x_train"], a["y_train"])
            self.val_set = tensor_dataset(a["x_val"], a["y_val"])
        if stage in ("test", None) and self.test_set is None:
            a = load_arrays(self.test_file, self.site, [("x", "y")], self.num_features)
            self.test_set = tensor_dataset(a["x"], a["y"])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=self.batch_size)
