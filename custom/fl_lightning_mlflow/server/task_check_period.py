"""Make each workflow's task_check_period take effect (FLARE 2.9 drops it).

ScatterAndGather, CrossSiteModelEval and the other controllers take `task_check_period`: how
often the server looks at its tasks. In FLARE 2.9 Controller.set_communicator hands it to the
WFCommServer as the attribute `task_check_period`, but WFCommServer's two loops (the task
monitor, which notices that every site has answered, and wait_for_task, which lets the workflow
go on) sleep on `_task_check_period`, its own default of 0.2 s. So the setting is ignored, and
every round waits up to 0.4 s after its last result before it aggregates; in the simulator a site
that polls in that gap then sleeps 0.5 s more before it asks again.

This component, at the start of the run, gives each workflow's communicator its workflow's own
period and says so once. Where FLARE no longer has the private attribute (a fixed FLARE), it does
nothing.
"""

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

# WFCommServer's attribute its loops sleep on; Controller keeps the configured value under the same name.
PRIVATE = "_task_check_period"


def apply_periods(workflows) -> list:
    """Sets each workflow's communicator to its controller's period; returns (workflow id, was, now)
    for each one changed. Workflows without a communicator, or without the attribute, are left alone."""
    changed = []
    for wf in workflows:
        controller = getattr(wf, "controller", None)
        communicator = getattr(controller, "communicator", None)
        wanted = getattr(controller, PRIVATE, None)
        if communicator is None or not hasattr(communicator, PRIVATE):
            continue
        if not isinstance(wanted, (int, float)) or isinstance(wanted, bool) or wanted <= 0:
            continue
        was = getattr(communicator, PRIVATE)
        if was != wanted:
            setattr(communicator, PRIVATE, wanted)
            changed.append((getattr(wf, "id", "?"), was, wanted))
    return changed


class TaskCheckPeriod(FLComponent):
    """config_fed_server.json: {"id": "task_check_period_fix", "path":
    "fl_lightning_mlflow.server.task_check_period.TaskCheckPeriod", "args": {}}; the periods are the
    workflows' own task_check_period arguments."""

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != EventType.START_RUN:
            return
        runner = fl_ctx.get_prop(FLContextKey.RUNNER)
        workflows = getattr(getattr(runner, "config", None), "workflows", None) or []
        changed = apply_periods(workflows)
        if changed:
            said = ", ".join(f"{wf} {now:g} s (FLARE's communicator had {was:g} s)" for wf, was, now in changed)
            self.log_info(fl_ctx, f"task_check_period in effect: {said}")
