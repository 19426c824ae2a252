"""FLARE's FedOpt generator, with its server optimizer kept across a server crash.

PTFedOptModelShareableGenerator holds in memory a server copy of the model (its parameters are
what the server optimizer steps: they equal the global model after every round), the optimizer
(SGD's momentum buffers, Adam's moments, its step count) and an optional LR scheduler; FLARE 2.9
persists none of it, and a new job would start them from the initial model and zero momentum.
ResumableFedOpt
  - writes all three after every round, right after the global model (AFTER_LEARNABLE_PERSIST),
    to fedopt_server_state.pt in the job's app folder (server.server_state);
  - at START_RUN of a continuation job (resume_state, carried in app/custom by flctl) loads them
    back, checked to be of the round before the continuation's first; a missing or bad file
    stops the job at once with one line.
Everything else is FLARE's generator, unchanged.
"""

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.fedopt import PTFedOptModelShareableGenerator

from fl_lightning_mlflow.server.server_state import (
    ServerStateError,
    load_state,
    resume_file,
    save_state,
    state_path,
)

KIND = "fedopt"


class ResumableFedOpt(PTFedOptModelShareableGenerator):
    def __init__(self, *args, resume_state: str = "", resume_round: int = -1, **kwargs):
        """resume_state: the state file a continuation starts from (relative: in app/custom), and
        resume_round the round it must end (the dead job's last); empty for a job's first start.
        Every other argument is PTFedOptModelShareableGenerator's."""
        super().__init__(*args, **kwargs)
        if not isinstance(resume_state, str):
            raise ValueError(f"ResumableFedOpt: resume_state must be a file name, got {resume_state!r}")
        if resume_state and (not isinstance(resume_round, int) or resume_round < 0):
            raise ValueError(f"ResumableFedOpt: resume_round must be the round the state ends, got {resume_round!r}")
        self.resume_state, self.resume_round = resume_state, resume_round
        self._app_dir = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN and self.optimizer is not None:  # None: FLARE's setup failed
            self._app_dir = fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())
            if self.resume_state:
                self._restore(fl_ctx)
        elif event_type == AppEventType.AFTER_LEARNABLE_PERSIST and self._app_dir is not None:
            fl_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            save_state(state_path(self._app_dir, KIND), KIND, fl_round, self.server_state())

    def server_state(self) -> dict:
        """The server model, the optimizer and the LR scheduler (if any), as state dicts."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def load_server_state(self, path) -> None:
        """Load a state file of round resume_round into the built model, optimizer and scheduler."""
        state = load_state(path, KIND, self.resume_round)
        if (self.lr_scheduler is None) != ("lr_scheduler" not in state):
            raise ServerStateError(f"{path}: the job's lr_scheduler_args and the saved state disagree")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.lr_scheduler is not None:
                self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        except (KeyError, RuntimeError, ValueError) as e:  # torch's words on what does not fit
            said = " ".join(str(e).split())[:200]  # torch's text spans lines
            raise ServerStateError(f"{path}: does not fit the job's model or optimizer: {said}") from None

    def _restore(self, fl_ctx: FLContext) -> None:
        path = resume_file(fl_ctx.get_prop(FLContextKey.APP_ROOT), self.resume_state)
        try:
            self.load_server_state(path)
        except ServerStateError as e:
            self.system_panic(f"ResumableFedOpt: {e}", fl_ctx)
            return
        self.log_info(fl_ctx, f"FedOpt server model and optimizer of round {self.resume_round} restored from {path}")
