"""Cross-site evaluation with a choice of what is evaluated: FLARE's CrossSiteModelEval, narrowed.

Every site evaluates every model it is given, so the validations grow as sites x models:
  "all"     each site's best local model (submit_model) and the global models (the model
            locator's: final and best): sites x (sites + 2) validations, FLARE's own behaviour;
  "global"  the global models only: sites x 2, no submit_model task;
  "none"    nothing is evaluated after training.

The choice is put in the workflow's context before CrossSiteModelEval fires CROSS_VAL_INIT, where
the tracker (server.tracker) reads it for the parent run's cross-site table.
"""

from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval

from fl_lightning_mlflow.common.protocol import CROSS_SITE_MODELS_PROP

CROSS_SITE_MODELS = ("all", "global", "none")


def check_models(models) -> str:
    """The cross_site_models setting, or one ValueError line naming it and where it is set."""
    if models not in CROSS_SITE_MODELS:
        raise ValueError(
            f"CrossSiteEval: models must be one of {', '.join(CROSS_SITE_MODELS)} "
            f"(config_fed_server.json's cross_site_models), got {models!r}"
        )
    return models


class CrossSiteEval(CrossSiteModelEval):
    def __init__(self, models: str = "all", **kwargs):
        """models: what is evaluated (module docstring); the other arguments are CrossSiteModelEval's.
        "global" asks no site for its model (no submit_model task); "none" evaluates nothing."""
        self.models = check_models(models)
        if models != "all":
            kwargs["submit_model_task_name"] = ""  # CrossSiteModelEval skips submit_model when it is ""
        if models == "none":
            kwargs["model_locator_id"] = ""
        super().__init__(**kwargs)

    def start_controller(self, fl_ctx: FLContext):
        # Sticky, and set before the base class fires CROSS_VAL_INIT with this context.
        fl_ctx.set_prop(CROSS_SITE_MODELS_PROP, self.models, private=False, sticky=True)
        super().start_controller(fl_ctx)

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        if self.models == "none":
            self.log_info(fl_ctx, "cross-site evaluation is off (cross_site_models: none)")
            return
        what = "the global models only" if self.models == "global" else "every site's model and the global models"
        self.log_info(fl_ctx, f"cross-site evaluation of {what} (cross_site_models: {self.models})")
        super().control_flow(abort_signal, fl_ctx)
