"""FLARE's SCAFFOLD workflow, with its global control variates kept across a server crash.

ScatterAndGatherScaffold holds the global controls c in memory only (`_global_ctrl_weights`,
zeros at start_controller, c += the average control difference after each round); FLARE 2.9
persists nothing of it. ResumableScaffold
  - writes c after every round, right after the global model (AFTER_LEARNABLE_PERSIST), to
    scaffold_server_state.pt in the job's app folder (server.server_state);
  - starts from such a file when a continuation job names it (resume_state, carried in the
    job's app/custom by flctl), checked to be of the round before start_round;
  - names the run's lineage in every train task (header SCAFFOLD_LINEAGE_HEADER): an id made at
    the first job's start and carried by every continuation, under which each site keeps its own
    controls c_i per round (site.scaffold_store), so a restarted site goes on from the c_i of the
    round before the one it is given.
Everything else is FLARE's workflow, unchanged.
"""

import uuid

import numpy as np
import torch
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.scatter_and_gather_scaffold import ScatterAndGatherScaffold

from fl_lightning_mlflow.common.protocol import SCAFFOLD_LINEAGE_HEADER
from fl_lightning_mlflow.server.server_state import (
    ServerStateError,
    load_state,
    resume_file,
    save_state,
    state_path,
)

KIND = "scaffold"


class ResumableScaffold(ScatterAndGatherScaffold):
    def __init__(self, *args, resume_state: str = "", **kwargs):
        """resume_state: the state file a continuation starts from (relative: in app/custom);
        empty for a job's first start. Every other argument is ScatterAndGatherScaffold's."""
        super().__init__(*args, **kwargs)
        if not isinstance(resume_state, str):
            raise ValueError(f"ResumableScaffold: resume_state must be a file name, got {resume_state!r}")
        self.resume_state = resume_state
        self.lineage = None
        self._app_dir = None

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        if self._global_ctrl_weights is None:  # FLARE's start failed (and said why)
            return
        self._app_dir = fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())
        if not self.resume_state:
            self.lineage = uuid.uuid4().hex
            return
        path = resume_file(fl_ctx.get_prop(FLContextKey.APP_ROOT), self.resume_state)
        try:
            self._restore(load_state(path, KIND, self._start_round - 1))
        except ServerStateError as e:
            self.system_panic(f"ResumableScaffold: {e}", fl_ctx)
            return
        self.log_info(fl_ctx, f"SCAFFOLD global controls of round {self._start_round - 1} restored from {path}")

    def _restore(self, state: dict) -> None:
        controls, lineage = state.get("controls"), state.get("lineage")
        if not isinstance(controls, dict) or not isinstance(lineage, str):
            raise ServerStateError("the scaffold server state has no controls or no lineage")
        expected = self._global_ctrl_weights or {}
        if set(controls) != set(expected):
            missing, extra = sorted(set(expected) - set(controls)), sorted(set(controls) - set(expected))
            raise ServerStateError(f"its controls do not fit the model (missing {missing[:3]}, extra {extra[:3]})")
        for name, value in controls.items():
            value = value.numpy()
            if value.shape != np.shape(expected[name]):
                raise ServerStateError(f"control {name!r} has shape {value.shape}, the model's {expected[name].shape}")
            self._global_ctrl_weights[name] = value.astype(np.asarray(expected[name]).dtype, copy=True)
        self.lineage = lineage

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == AppEventType.AFTER_LEARNABLE_PERSIST and self._app_dir is not None:
            self._save(fl_ctx)

    def _save(self, fl_ctx: FLContext) -> None:
        fl_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        controls = {k: torch.as_tensor(np.asarray(v)) for k, v in self._global_ctrl_weights.items()}
        save_state(state_path(self._app_dir, KIND), KIND, fl_round, {"controls": controls, "lineage": self.lineage})

    def _prepare_train_task_data(self, client_task, fl_ctx: FLContext) -> None:
        client_task.task.data.set_header(SCAFFOLD_LINEAGE_HEADER, self.lineage)
        super()._prepare_train_task_data(client_task, fl_ctx)
