"""Site datasets as MLflow dataset inputs: what a site sends (site.dataset_info), how the server
checks it (server.dataset_inputs, records.RecordChecker.datasets) and what MLflow stores."""

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fl_lightning_mlflow.server.dataset_inputs import CONTEXT_TAG, dataset_input, problem_of
from fl_lightning_mlflow.server.records import RecordChecker
from fl_lightning_mlflow.site.dataset_info import describe, digest_of, label_histogram, site_datasets


class Data(pl.LightningDataModule):
    """A site's DataModule: its loaders' sets are TensorDatasets of features and targets."""

    def __init__(self, train_targets, val_targets, data_root="/data/cifar10", sample_shape=(3, 2, 2)):
        super().__init__()
        self.data_root = data_root

        def tensors(targets):
            return TensorDataset(torch.ones(len(targets), *sample_shape), torch.tensor(targets))

        self.train_set, self.val_set = tensors(train_targets), tensors(val_targets)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=2, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=2)


class Noisy(Dataset):
    """A Dataset of one's own (not tensors up front): (features, float target) per index."""

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.full((7,), float(i), dtype=torch.float64), float(i) / 2


class Unnamed(pl.LightningDataModule):
    """A DataModule without data_root, over Datasets of its own."""

    def train_dataloader(self):
        return DataLoader(Noisy(), batch_size=2)

    def val_dataloader(self):
        return DataLoader(Noisy(), batch_size=2)


def test_a_site_describes_its_data_by_digest_size_and_labels_never_samples():
    sent = site_datasets("site-1", Data([0, 1, 1, 9], [2, 2]))
    assert set(sent) == {"training", "validation"}
    train = json.loads(sent["training"])
    assert train == {
        "name": "site-1-train",
        "digest": train["digest"],
        "num_samples": 4,
        "label_histogram": {"0": 1, "1": 2, "9": 1},
        "source": "/data/cifar10",
        "input_shape": [3, 2, 2],  # one sample's features: the logged models' input example
        "input_dtype": "float32",
    }
    assert len(train["digest"]) == 16
    val = json.loads(sent["validation"])
    assert val == {
        "name": "site-1-val",
        "digest": val["digest"],
        "num_samples": 2,
        "label_histogram": {"2": 2},
        "source": "/data/cifar10",
    }  # the input spec is the training set's only
    assert problem_of("training", sent["training"]) is None and problem_of("validation", sent["validation"]) is None
    # The same data give the same digest (shuffled loaders or not); other labels give another.
    assert site_datasets("site-2", Data([0, 1, 1, 9], [2, 2]))["training"] == sent["training"].replace(
        "site-1", "site-2"
    )
    assert json.loads(site_datasets("site-1", Data([0, 1, 1, 8], [2, 2]))["training"])["digest"] != train["digest"]


def test_a_regression_is_described_by_size_and_input_shape_with_no_label_histogram():
    sent = site_datasets("site-1", Data([0.5, 1.25, -3.0], [2.0], data_root="/data/tabular", sample_shape=(8,)))
    train = json.loads(sent["training"])
    assert train["label_histogram"] == {} and train["num_samples"] == 3
    assert (train["input_shape"], train["input_dtype"]) == ([8], "float32")
    assert json.loads(sent["validation"])["label_histogram"] == {}
    # What the server makes of it: accepted, an empty histogram and the input shape in the profile.
    assert [problem_of(c, text) for c, text in sent.items()] == [None, None]
    profile = json.loads(dataset_input("training", sent["training"]).dataset.profile)
    assert profile == {"num_samples": 3, "label_histogram": {}, "input_shape": [8], "input_dtype": "float32"}


def test_a_dataset_of_ones_own_is_described_by_its_length_and_first_sample():
    sent = site_datasets("site-3", Unnamed())
    train = json.loads(sent["training"])
    assert train == {
        "name": "site-3-train",
        "digest": train["digest"],
        "num_samples": 5,
        "label_histogram": {},  # samples are not read to count labels
        "source": "Unnamed",  # no data_root: the DataModule's class names the source
        "input_shape": [7],
        "input_dtype": "float64",
    }
    assert problem_of("training", sent["training"]) is None


def test_the_digest_follows_the_data_and_the_labels():
    images, labels = np.zeros((3, 2)), np.array([0, 1, 2])
    same = digest_of(labels, images)
    assert digest_of(labels, images.copy()) == same
    assert digest_of(np.array([0, 1, 1]), images) != same
    assert digest_of(labels, images + 1) != same
    assert label_histogram([3, 1, 3]) == {"1": 1, "3": 2}


BAD_SHAPE = "training: input_shape must be at most 8 sizes >= 1, with an input_dtype torch knows"


@pytest.mark.parametrize(
    "context,change,reason",
    [
        ("testing", {}, "has context 'testing', not one of training, validation"),
        ("training", {"digest": ""}, "training: digest must be text of 1..36 characters"),
        ("training", {"digest": "x" * 37}, "training: digest must be text of 1..36 characters"),
        ("training", {"name": None}, "training: name must be text of 1..500 characters"),
        ("training", {"num_samples": -1}, "training: num_samples must be an integer >= 0"),
        ("training", {"num_samples": True}, "training: num_samples must be an integer >= 0"),
        ("training", {"label_histogram": [1]}, "training: label_histogram must map at most 1000 labels to counts"),
        ("training", {"num_samples": 5}, "training: label_histogram counts 4 samples, num_samples says 5"),
        ("training", {"source": 7}, "training: source must be text of at most 6000 characters"),
        ("training", {"input_shape": [3, 0, 32]}, BAD_SHAPE),
        ("training", {"input_shape": [3, -32]}, BAD_SHAPE),
        ("training", {"input_shape": [3.0, 32]}, BAD_SHAPE),
        ("training", {"input_shape": [True, 32]}, BAD_SHAPE),
        ("training", {"input_shape": "3x32x32"}, BAD_SHAPE),
        ("training", {"input_shape": [2] * 9}, BAD_SHAPE),
        ("training", {"input_shape": None}, BAD_SHAPE),
        ("training", {"input_shape": [3, 32, 32], "input_dtype": "complex64"}, BAD_SHAPE),
        ("training", {"input_shape": [3, 32, 32], "input_dtype": None}, BAD_SHAPE),
        ("validation", {"input_shape": [3, 32, 32]}, BAD_SHAPE.replace("training", "validation")),  # no dtype
    ],
)
def test_what_mlflow_would_not_take_is_refused_with_the_field_named(context, change, reason):
    info = {**describe("site-1-train", np.zeros((4, 2)), [0, 1, 1, 9], "/d"), **change}
    assert problem_of(context, json.dumps(info)) == reason


@pytest.mark.parametrize(
    "change",
    [
        {"label_histogram": {}},  # a regression's targets: no labels to count
        {"input_shape": [3, 32, 32], "input_dtype": "float32"},
        {"input_shape": [8], "input_dtype": "float64", "label_histogram": {}},
        {"input_shape": [2] * 8, "input_dtype": "uint8"},
    ],
)
def test_what_a_site_may_send_is_accepted(change):
    info = {**describe("site-1-train", np.zeros((4, 2)), [0, 1, 1, 9], "/d"), **change}
    assert problem_of("training", json.dumps(info)) is None


def test_a_malformed_input_shape_is_one_line_and_leaves_out_the_whole_context():
    good = json.dumps(describe("site-1-train", np.zeros((2, 2)), [0, 1], "/d"))
    bad = json.dumps({**json.loads(good), "input_shape": [3, 0], "input_dtype": "float32"})
    warnings = []
    checker = RecordChecker(warn=warnings.append)
    assert checker.datasets("site-1", {"training": bad, "validation": good}) == [("validation", good)]
    assert warnings == [f"rejected site-1: dataset {BAD_SHAPE}"]
    assert "\n" not in warnings[0]


def test_text_that_is_not_a_json_object_is_refused():
    assert problem_of("training", "{") == "training is not JSON (JSONDecodeError)"
    assert problem_of("validation", "[1]") == "validation is not a JSON object"


def test_the_record_checker_passes_good_contexts_and_logs_each_problem_once():
    warnings = []
    checker = RecordChecker(warn=warnings.append)
    good = json.dumps(describe("site-1-val", np.zeros((2, 2)), [0, 1], "/d"))
    accepted = checker.datasets("site-1", {"validation": good, "testing": good})
    assert accepted == [("validation", good)]
    checker.datasets("site-1", {"testing": good})
    assert warnings == ["rejected site-1: dataset has context 'testing', not one of training, validation"]
    assert checker.datasets("site-2", "not a dict") == []
    assert checker.rejected["site-2: datasets record is not {context: JSON text}"] == 1
    assert checker.received == {}  # not points: delivery accounting does not count them


def test_mlflow_stores_a_metadata_only_input_per_context(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("datasets")).info.run_id
    sent = site_datasets("site-1", Data([0, 1, 1], [1], data_root="/data"))
    inputs = [dataset_input(c, text) for c, text in sent.items()]
    client.log_inputs(run_id, datasets=inputs)
    client.log_inputs(run_id, datasets=inputs)  # a restarted site sending again: still one per context
    stored = client.get_run(run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in d.tags if t.key == CONTEXT_TAG): d.dataset for d in stored}
    assert sorted(by_context) == ["training", "validation"] and len(stored) == 2
    train = by_context["training"]
    assert train.name == "site-1-train" and train.digest == json.loads(sent["training"])["digest"]
    assert json.loads(train.profile) == {
        "num_samples": 3,
        "label_histogram": {"0": 1, "1": 2},
        "input_shape": [3, 2, 2],
        "input_dtype": "float32",
    }
    assert json.loads(by_context["validation"].profile) == {"num_samples": 1, "label_histogram": {"1": 1}}
    assert json.loads(train.source) == {"uri": "/data"} and train.source_type == "local"
