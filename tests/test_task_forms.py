"""A train task as FLARE sends it and its result in the same form (site.task_forms): FedAvg's
WEIGHTS, ScatterAndGatherScaffold's collection, the FLModel controller's meta; FLARE's real DXOs."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants

from fl_lightning_mlflow.site.engine import FitResult
from fl_lightning_mlflow.site.task_forms import TrainTask, weights_of

W = {"w": np.ones((2, 2), dtype=np.float32)}
C = {"w": np.full((2, 2), 0.1, dtype=np.float32)}
CTRL_GLOBAL, CTRL_DIFF = AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL, AlgorithmConstants.SCAFFOLD_CTRL_DIFF


def fit(control_diff=None) -> FitResult:
    return FitResult(weights=W, samples=12, steps=3, control_diff=control_diff)


def test_fedavg_weights_in_a_weight_diff_out():
    task = TrainTask.of(DXO(data_kind=DataKind.WEIGHTS, data=W))
    assert task.controls is None and np.array_equal(task.weights["w"], W["w"])
    diff = DXO(data_kind=DataKind.WEIGHT_DIFF, data=W)
    assert task.result(diff, fit()) is diff


def test_scaffold_collection_is_answered_as_a_collection_each_part_weighted():
    parts = {AppConstants.MODEL_WEIGHTS: DXO(DataKind.WEIGHTS, W), CTRL_GLOBAL: DXO(DataKind.WEIGHT_DIFF, C)}
    task = TrainTask.of(DXO(data_kind=DataKind.COLLECTION, data=parts))
    assert task.form == "collection" and set(task.controls) == {"w"}
    result = task.result(DXO(DataKind.WEIGHT_DIFF, W), fit(control_diff=C))
    assert result.data_kind == DataKind.COLLECTION and set(result.data) == {AppConstants.MODEL_WEIGHTS, CTRL_DIFF}
    for part in result.data.values():
        assert part.data_kind == DataKind.WEIGHT_DIFF and part.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 12
    # a collection without controls is plain FedAvg
    plain = TrainTask.of(DXO(DataKind.COLLECTION, {AppConstants.MODEL_WEIGHTS: DXO(DataKind.WEIGHTS, W)}))
    assert plain.controls is None


def test_scaffold_controls_in_the_meta_are_answered_in_the_meta():
    dxo = DXO(data_kind=DataKind.WEIGHTS, data=W)
    dxo.set_meta_prop(CTRL_GLOBAL, C)
    task = TrainTask.of(dxo)
    assert task.form == "meta"
    result = task.result(DXO(DataKind.WEIGHT_DIFF, W), fit(control_diff=C))
    assert result.data_kind == DataKind.WEIGHT_DIFF and set(result.get_meta_prop(CTRL_DIFF)) == {"w"}


def test_what_cannot_be_a_train_task_or_its_result_is_one_line():
    with pytest.raises(ValueError, match=r"^a train task collection needs '_model_weights_', got \['x'\]$"):
        TrainTask.of(DXO(DataKind.COLLECTION, {"x": DXO(DataKind.WEIGHTS, W)}))
    with pytest.raises(ValueError, match=r"^expected WEIGHTS, got .*WEIGHT_DIFF$"):
        weights_of(DXO(DataKind.WEIGHT_DIFF, W))
    task = TrainTask(W, C, "collection")
    with pytest.raises(ValueError, match="the engine returned no SCAFFOLD control difference"):
        task.result(DXO(DataKind.WEIGHT_DIFF, W), fit())
