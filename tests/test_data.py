"""The per-site split, the offline dataset and the errors bad data gets."""

import json
import pickle

import numpy as np
import pytest

from fl_lightning_mlflow.site.data import (
    NUM_CLASSES,
    SiteDataError,
    SiteDataModule,
    batches_dir,
    read_test_set,
    read_train_set,
    split_path,
)
from flctl.data_prep import dirichlet_split, iid_split, label_skew, write_splits


@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(7).integers(0, NUM_CLASSES, size=5000)


def test_iid_split_sizes_add_up_and_parts_are_disjoint(labels):
    parts = iid_split(len(labels), 3, np.random.default_rng(0))
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) == len(set(joined.tolist()))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("alpha", [0.1, 0.5, 10.0])
def test_dirichlet_split_sizes_add_up_and_parts_are_disjoint(labels, alpha):
    parts = dirichlet_split(labels, 4, alpha, np.random.default_rng(0))
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))
    assert min(map(len, parts)) >= 10


def test_dirichlet_skew_grows_as_concentration_falls(labels):
    def skew(alpha):
        return np.mean(
            [label_skew(labels, dirichlet_split(labels, 4, alpha, np.random.default_rng(s))) for s in range(5)]
        )

    assert skew(0.1) > skew(1.0) > skew(100.0)
    assert label_skew(labels, iid_split(len(labels), 4, np.random.default_rng(0))) < skew(1.0)


def test_split_files_are_reproducible_from_the_seed_and_hold_out_validation(tmp_path, labels):
    first = write_splits(tmp_path / "a", labels, 3, 0.5, 11, 0.1)
    write_splits(tmp_path / "b", labels, 3, 0.5, 11, 0.1)
    for site in ("site-1", "site-2", "site-3"):
        a = json.loads(split_path(tmp_path / "a", site).read_text())
        assert a == json.loads(split_path(tmp_path / "b", site).read_text())
        assert not set(a["train"]) & set(a["val"])
        assert first["counts"][site] == {"train": len(a["train"]), "val": len(a["val"])}
    total = sum(c["train"] + c["val"] for c in first["counts"].values())
    assert total == len(labels)


def test_a_smaller_split_removes_sites_of_a_bigger_one(tmp_path, labels):
    write_splits(tmp_path, labels, 4, None, 0, 0.1)
    write_splits(tmp_path, labels, 2, None, 0, 0.1)
    assert sorted(p.name for p in (tmp_path / "splits").glob("site-*.json")) == ["site-1.json", "site-2.json"]


def test_offline_dataset_has_cifar_layout_and_every_class(offline_data):
    images, labels = read_train_set(offline_data)
    assert images.shape == (6000, 3, 32, 32) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(NUM_CLASSES))
    test_images, _ = read_test_set(offline_data)
    assert test_images.shape == (1000, 3, 32, 32)
    for name in ("data_batch_1", "test_batch"):
        with open(batches_dir(offline_data) / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        assert set(entry) >= {"data", "labels"}


def test_site_datamodule_reads_only_its_own_share(offline_data):
    dm = SiteDataModule(str(offline_data), "site-1", batch_size=64)
    dm.setup("fit")
    split = json.loads(split_path(offline_data, "site-1").read_text())
    assert len(dm.train_set) == len(split["train"]) and len(dm.val_set) == len(split["val"])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,)


# ----- bad data: one clear line naming the site and the path ----------------------------
def copy_data(src, dest):
    import shutil

    shutil.copytree(src, dest)
    return dest


def expect_error(root, site, fragment, path):
    with pytest.raises(SiteDataError) as err:
        SiteDataModule(str(root), site).load()
    message = str(err.value)
    assert "\n" not in message
    assert f"site {site}" in message and fragment in message and str(path) in message
    return message


def test_missing_data_folder(tmp_path):
    expect_error(tmp_path / "nowhere", "site-1", "missing data folder", tmp_path / "nowhere")


def test_missing_split_file(offline_data):
    expect_error(offline_data, "site-9", "missing split file", split_path(offline_data, "site-9"))


def test_empty_split(offline_data, tmp_path):
    root = copy_data(offline_data, tmp_path / "d")
    split_path(root, "site-1").write_text(json.dumps({"train": [], "val": []}))
    expect_error(root, "site-1", "empty split", split_path(root, "site-1"))


def test_truncated_data_file(offline_data, tmp_path):
    root = copy_data(offline_data, tmp_path / "d")
    path = batches_dir(root) / "data_batch_2"
    path.write_bytes(path.read_bytes()[:1000])
    expect_error(root, "site-2", "unreadable data file", path)


def test_images_of_the_wrong_shape(offline_data, tmp_path):
    root = copy_data(offline_data, tmp_path / "d")
    path = batches_dir(root) / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((10, 28 * 28), np.uint8), "labels": [0] * 10}, f)
    expect_error(root, "site-1", "images have shape", path)


def test_labels_out_of_range(offline_data, tmp_path):
    root = copy_data(offline_data, tmp_path / "d")
    path = batches_dir(root) / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((10, 3072), np.uint8), "labels": [12] * 10}, f)
    expect_error(root, "site-1", "labels outside", path)


def test_split_indices_out_of_range(offline_data, tmp_path):
    root = copy_data(offline_data, tmp_path / "d")
    split_path(root, "site-1").write_text(json.dumps({"train": [0, 99999], "val": []}))
    expect_error(root, "site-1", "train indices outside", split_path(root, "site-1"))
