"""The per-site split, the offline dataset (and its difficulty knob) and the errors bad data gets."""

import hashlib
import json
import math
import pickle

import numpy as np
import pytest

from cifar10_example.data import (
    BATCHES_DIR,
    NUM_CLASSES,
    CifarDataModule,
    SiteDataError,
    batches_dir,
    read_test_set,
    read_train_set,
    split_path,
)
from flctl import data_prep
from flctl.cli import main
from flctl.data_prep import dirichlet_split, iid_split, label_skew, write_splits
from flctl.errors import CliError


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
    dm = CifarDataModule(str(offline_data), "site-1", batch_size=64)
    dm.setup("fit")
    split = json.loads(split_path(offline_data, "site-1").read_text())
    assert len(dm.train_set) == len(split["train"]) and len(dm.val_set) == len(split["val"])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,)


# ----- the offline set's difficulty ------------------------------------------------------
OFFLINE_FILES = [f"cifar-10-batches-py/{name}" for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")]
OFFLINE_FILES += ["cifar-10-batches-py/batches.meta", "OFFLINE_SYNTHETIC_DATA"]
SMALL = (300, 60)  # train, test sizes that generate in well under a second


def offline_digest(root) -> str:
    """sha256 over the bytes of the offline set's files (not offline_info.json, which is new)."""
    digest = hashlib.sha256()
    for name in OFFLINE_FILES:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


def test_difficulty_zero_is_byte_for_byte_the_set_from_before_the_knob(offline_data, tmp_path):
    # Digests of generate_offline's output before the difficulty knob existed (seed 1234): the
    # easy set, its tests and figures stay exactly as they were. offline_data has the default sizes.
    assert offline_digest(offline_data) == "69539d2ec24a94f1863e829fa1fd2325c6e04cda13680e261d9feabadf016b0d"
    data_prep.generate_offline(tmp_path, *SMALL, seed=1234, difficulty=0)
    assert offline_digest(tmp_path) == "c63db5864bd3a249181c92305d053ec7fb030dbb71e3ae12c6fdb0b79494aae9"
    assert json.loads((tmp_path / data_prep.OFFLINE_INFO).read_text())["difficulty"] == 0


@pytest.mark.parametrize("bad", [-0.1, 1.01, "2", "hard", "", None, math.nan, math.inf, True])
def test_a_difficulty_outside_zero_to_one_is_refused(bad, tmp_path):
    with pytest.raises(ValueError, match=r"difficulty must be a number in \[0, 1\]"):
        data_prep.generate_offline(tmp_path, *SMALL, difficulty=bad)
    assert not (tmp_path / "cifar-10-batches-py").exists()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--offline", "--difficulty", "1.5"], 2, "argument --difficulty: must be a number in [0, 1], got '1.5'"),
        (["--offline", "--difficulty", "hard"], 2, "argument --difficulty: must be a number in [0, 1], got 'hard'"),
        (["--difficulty", "0.5"], 1, "--difficulty applies to the offline dataset only (add --offline)"),
    ],
)
def test_prepare_data_refuses_a_bad_difficulty_in_one_line(args, code, message, tmp_path, capsys):
    try:
        rc = data_prep.main(["--data-root", str(tmp_path / "d"), *args])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code and err.startswith("flctl prepare-data: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_a_harder_set_is_deterministic_per_seed_and_differs_from_the_easy_one(tmp_path):
    digests = {}
    for name, seed, difficulty in [("a", 5, 0.5), ("b", 5, 0.5), ("c", 6, 0.5), ("d", 5, 0.8), ("e", 5, 0.0)]:
        data_prep.generate_offline(tmp_path / name, *SMALL, seed=seed, difficulty=difficulty)
        digests[name] = offline_digest(tmp_path / name)
    assert digests["a"] == digests["b"]
    assert len({digests[k] for k in "acde"}) == 4
    info = json.loads((tmp_path / "a" / data_prep.OFFLINE_INFO).read_text())
    assert info == {"difficulty": 0.5, "seed": 5, "train_size": SMALL[0], "test_size": SMALL[1]}
    assert data_prep.offline_difficulty(tmp_path / "a") == 0.5
    images, labels = read_train_set(tmp_path / "a")
    assert images.shape == (SMALL[0], 3, 32, 32) and set(labels.tolist()) == set(range(NUM_CLASSES))
    assert read_test_set(tmp_path / "a")[0].shape == (SMALL[1], 3, 32, 32)


def test_prepare_regenerates_the_offline_set_only_when_the_difficulty_changes(tmp_path):
    root, said = tmp_path / "offline", []

    def prepare(difficulty, sites=2):
        said.clear()
        data_prep.prepare(root, sites, offline=True, offline_sizes=SMALL, say=said.append, difficulty=difficulty)
        return offline_digest(root), any(line.startswith("generating") for line in said)

    easy, generated = prepare(None)  # a new set: difficulty 0
    assert generated and data_prep.offline_difficulty(root) == 0
    assert prepare(0) == (easy, False)
    hard, generated = prepare(data_prep.HARD_DIFFICULTY)
    assert generated and hard != easy and "replacing the set of difficulty 0.0" in said[0]
    assert data_prep.offline_difficulty(root) == data_prep.HARD_DIFFICULTY
    assert prepare(None, sites=3) == (hard, False)  # no difficulty given: the set on disk is kept
    assert json.loads((root / "splits" / "split_info.json").read_text())["sites"] == 3
    assert prepare(data_prep.HARD_DIFFICULTY) == (hard, False)
    assert prepare(0) == (easy, True)
    (root / data_prep.OFFLINE_INFO).unlink()  # a set made before the knob: difficulty 0
    assert data_prep.offline_difficulty(root) == 0 and prepare(0) == (easy, False)
    (root / data_prep.OFFLINE_INFO).write_text("{not json")  # unknown: a given difficulty regenerates
    assert prepare(0) == (easy, True)
    with pytest.raises(CliError, match="difficulty must be a number"):
        data_prep.prepare(root, 2, offline=True, offline_sizes=SMALL, say=said.append, difficulty=3)


# ----- bad data: one clear line naming the site and the path ----------------------------
def copy_data(src, dest):
    import shutil

    shutil.copytree(src, dest)
    return dest


def expect_error(root, site, fragment, path):
    with pytest.raises(SiteDataError) as err:
        CifarDataModule(str(root), site).load()
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


def own_cifar_copy(tmp_path, n_train=500, n_test=100):
    """CIFAR-10's python batches that read correctly but are not torchvision's files (the user's
    own copy): the offline generator's output without its offline marker."""
    root = tmp_path / "my-cifar"
    data_prep.generate_offline(root, n_train, n_test)
    for name in (data_prep.OFFLINE_MARKER, data_prep.OFFLINE_INFO):
        (root / name).unlink(missing_ok=True)
    return root


# Any download attempt goes to a proxy on a closed loopback port: refused at once, never the network.
NO_INTERNET = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def test_a_folder_of_readable_cifar_batches_is_used_as_it_is(tmp_path, monkeypatch):
    for key, value in NO_INTERNET.items():
        monkeypatch.setenv(key, value)
    root = own_cifar_copy(tmp_path)
    said = []
    info = data_prep.prepare(root, sites=2, say=said.append)
    assert said[0] == f"data: using the CIFAR-10 batches in {root / BATCHES_DIR} as they are"
    assert sum(c["train"] + c["val"] for c in info["counts"].values()) == 500


def test_without_internet_the_download_fails_in_one_line_that_offers_the_ways_out(tmp_path, monkeypatch, capsys):
    for key, value in NO_INTERNET.items():
        monkeypatch.setenv(key, value)
    assert main(["prepare-data", "--data-root", str(tmp_path / "cifar")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # no traceback
    assert lines[0].startswith("flctl prepare-data: CIFAR-10 could not be downloaded (URLError: ")
    assert "use --offline (a generated stand-in), or --data-root DIR with CIFAR-10's python batches" in lines[0]
