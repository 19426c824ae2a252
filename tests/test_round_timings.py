"""The federation's timings per round (fl/ metrics on the parent run) and an update's size."""

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind

from fl_lightning_mlflow.server.round_timings import RoundTimings, update_bytes


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_round_duration_wait_for_the_slowest_site_and_update_size():
    clock = Clock()
    timings = RoundTimings(clock)
    timings.start()
    clock.now = 103.0
    timings.accepted(1000)  # the fastest site
    clock.now = 107.5
    timings.accepted(2000)  # the slowest: the round waited 4.5 s for it
    clock.now = 108.0
    assert dict(timings.done()) == {
        "fl/round_duration_seconds": 8.0,
        "fl/slowest_site_wait_seconds": 4.5,
        "fl/update_size_bytes": 3000,
    }
    assert timings.done() == []  # each round once; a round whose start was not seen has no timings


def test_a_round_without_updates_has_no_wait_and_zero_bytes():
    timings = RoundTimings(Clock())
    timings.start()
    assert dict(timings.done()) == {"fl/round_duration_seconds": 0.0, "fl/update_size_bytes": 0}


def test_update_bytes_counts_arrays_in_plain_and_collection_updates():
    weights = {"a": np.zeros((10, 10), dtype=np.float32), "b": np.zeros(5, dtype=np.float64)}
    assert update_bytes(weights) == 400 + 40
    diff = DXO(data_kind=DataKind.WEIGHT_DIFF, data=weights)
    controls = DXO(data_kind=DataKind.WEIGHT_DIFF, data={"c": torch.zeros(3)})
    collection = DXO(data_kind=DataKind.COLLECTION, data={"weights": diff, "controls": controls})
    assert update_bytes(diff) == 440
    assert update_bytes(collection) == 440 + 12  # SCAFFOLD: the control difference travels too
    assert update_bytes(None) == 0 and update_bytes({"meta": "text"}) == 0
