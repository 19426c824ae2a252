"""Site datasets as MLflow dataset inputs: what a site sends (site.dataset_info), how the server
checks it (server.dataset_inputs, records.RecordChecker.datasets) and what MLflow stores."""

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import TensorDataset

from fl_lightning_mlflow.server.dataset_inputs import CONTEXT_TAG, dataset_input, problem_of
from fl_lightning_mlflow.server.records import RecordChecker
from fl_lightning_mlflow.site.dataset_info import describe, digest_of, label_histogram, site_datasets


class Data:
    """A SiteDataModule's two sets (TensorDatasets of images and labels)."""

    def __init__(self, train_labels, val_labels):
        def tensors(labels):
            return TensorDataset(torch.ones(len(labels), 3, 2, 2), torch.tensor(labels))

        self.train_set, self.val_set = tensors(train_labels), tensors(val_labels)


def test_a_site_describes_its_data_by_digest_size_and_labels_never_samples():
    sent = site_datasets("site-1", Data([0, 1, 1, 9], [2, 2]), "/data/cifar10")
    assert set(sent) == {"training", "validation"}
    train = json.loads(sent["training"])
    assert train == {
        "name": "site-1-train",
        "digest": train["digest"],
        "num_samples": 4,
        "label_histogram": {"0": 1, "1": 2, "9": 1},
        "source": "/data/cifar10",
    }
    assert len(train["digest"]) == 16 and json.loads(sent["validation"])["num_samples"] == 2


def test_the_digest_follows_the_data_and_the_labels():
    images, labels = np.zeros((3, 2)), np.array([0, 1, 2])
    same = digest_of(labels, images)
    assert digest_of(labels, images.copy()) == same
    assert digest_of(np.array([0, 1, 1]), images) != same
    assert digest_of(labels, images + 1) != same
    assert label_histogram([3, 1, 3]) == {"1": 1, "3": 2}


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
    ],
)
def test_what_mlflow_would_not_take_is_refused_with_the_field_named(context, change, reason):
    info = {**describe("site-1-train", np.zeros((4, 2)), [0, 1, 1, 9], "/d"), **change}
    assert problem_of(context, json.dumps(info)) == reason


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
    sent = site_datasets("site-1", Data([0, 1, 1], [1]), "/data")
    inputs = [dataset_input(c, text) for c, text in sent.items()]
    client.log_inputs(run_id, datasets=inputs)
    client.log_inputs(run_id, datasets=inputs)  # a restarted site sending again: still one per context
    stored = client.get_run(run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in d.tags if t.key == CONTEXT_TAG): d.dataset for d in stored}
    assert sorted(by_context) == ["training", "validation"] and len(stored) == 2
    train = by_context["training"]
    assert train.name == "site-1-train" and train.digest == json.loads(sent["training"])["digest"]
    assert json.loads(train.profile) == {"num_samples": 3, "label_histogram": {"0": 1, "1": 2}}
    assert json.loads(train.source) == {"uri": "/data"} and train.source_type == "local"
