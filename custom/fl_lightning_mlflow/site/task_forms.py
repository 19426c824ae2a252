"""A train task as FLARE sends it, and its result in the same form: FedAvg's, and SCAFFOLD's two.

FedAvg: a WEIGHTS DXO; the result is one WEIGHT_DIFF DXO. SCAFFOLD, as FLARE's
ScatterAndGatherScaffold sends it: a DXO collection {MODEL_WEIGHTS, SCAFFOLD_CTRL_GLOBAL},
answered in kind with a collection {MODEL_WEIGHTS: the weight difference, SCAFFOLD_CTRL_DIFF: the
change of the site's controls}, each a WEIGHT_DIFF that InTimeAccumulateWeightedAggregator
averages key by key; or, from FLARE's FLModel-based Scaffold controller, the controls in the task
DXO's meta, answered in the result's meta. The algorithm itself is site.algorithms.
"""

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants


def weights_of(dxo: DXO) -> dict:
    if dxo.data_kind != DataKind.WEIGHTS:
        raise ValueError(f"expected WEIGHTS, got {dxo.data_kind}")
    return {k: np.asarray(v) for k, v in dxo.data.items()}


class GlobalControls(dict):
    """The global controls c of a SCAFFOLD task, with where they belong: the lineage the server
    names (server.scaffold_workflow; None from FLARE's own workflow) and the task's round. The
    engines pass them on to site.algorithms.ScaffoldSite.start, which reads both."""

    def __init__(self, controls: dict, lineage: str | None = None, fl_round: int | None = None):
        super().__init__(controls)
        self.lineage, self.fl_round = lineage, fl_round


class TrainTask:
    """What a train task brings: the global weights and, for SCAFFOLD, the global controls,
    in one of FLARE's two forms ("collection" or "meta", see the module's docstring)."""

    def __init__(self, weights: dict, controls: dict | None = None, form: str | None = None):
        self.weights, self.controls, self.form = weights, controls, form

    @classmethod
    def of(cls, dxo: DXO, lineage: str | None = None, fl_round: int | None = None) -> "TrainTask":
        task = cls._of(dxo)
        if task.controls is not None:
            task.controls = GlobalControls(task.controls, lineage, fl_round)
        return task

    @classmethod
    def _of(cls, dxo: DXO) -> "TrainTask":
        if dxo.data_kind == DataKind.COLLECTION:  # ScatterAndGatherScaffold
            parts = dxo.data if isinstance(dxo.data, dict) else {}
            weights, controls = (
                parts.get(AppConstants.MODEL_WEIGHTS),
                parts.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL),
            )
            if not isinstance(weights, DXO):
                raise ValueError(f"a train task collection needs {AppConstants.MODEL_WEIGHTS!r}, got {sorted(parts)}")
            if not isinstance(controls, DXO):
                return cls(weights_of(weights))
            return cls(weights_of(weights), dict(controls.data), "collection")
        controls = dxo.get_meta_prop(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
        return cls(weights_of(dxo), dict(controls), "meta") if controls is not None else cls(weights_of(dxo))

    def result(self, weight_diff: DXO, fit) -> DXO:
        """The result DXO for this task's form, holding weight_diff (and the control difference)."""
        if self.controls is None:
            return weight_diff
        if fit.control_diff is None:
            raise ValueError("the engine returned no SCAFFOLD control difference for a SCAFFOLD task")
        if self.form == "meta":
            weight_diff.set_meta_prop(AlgorithmConstants.SCAFFOLD_CTRL_DIFF, fit.control_diff)
            return weight_diff
        controls = DXO(data_kind=DataKind.WEIGHT_DIFF, data=fit.control_diff)
        for part in (weight_diff, controls):  # each part is weighted by the samples seen, as FedAvg's update
            part.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, fit.samples)
        parts = {AppConstants.MODEL_WEIGHTS: weight_diff, AlgorithmConstants.SCAFFOLD_CTRL_DIFF: controls}
        return DXO(data_kind=DataKind.COLLECTION, data=parts)
