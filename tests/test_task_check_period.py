"""TaskCheckPeriod on FLARE's own workflow objects: FLARE 2.9 leaves a workflow's task_check_period
off the WFCommServer that runs its task loops; the component puts it there at START_RUN."""

from types import SimpleNamespace

import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContextManager
from nvflare.apis.impl.wf_comm_server import WFCommServer
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.private.fed.server.server_json_config import WorkFlow
from nvflare.private.fed.server.server_runner import ServerRunnerConfig

from fl_lightning_mlflow.server.task_check_period import PRIVATE, TaskCheckPeriod, apply_periods


def workflow(wf_id, controller):
    """A workflow as FLARE's server config builds it: the controller with its own WFCommServer."""
    controller.set_communicator(WFCommServer())
    return WorkFlow(wf_id, controller)


def sag(period):
    return ScatterAndGather(min_clients=2, num_rounds=2, task_check_period=period)


def start_run(component, workflows, event=EventType.START_RUN):
    """START_RUN (or event) with the server's runner in the context, as FLARE's ServerRunner fires it."""
    config = ServerRunnerConfig(heartbeat_timeout=60, task_request_interval=0.25, workflows=workflows,
                                task_data_filters={}, task_result_filters={})  # fmt: skip
    fl_ctx = FLContextManager(identity_name="server", job_id="job-1").new_context()
    fl_ctx.set_prop(FLContextKey.RUNNER, SimpleNamespace(config=config), private=True, sticky=False)
    component.handle_event(event, fl_ctx)
    return fl_ctx


def test_flare_loses_the_period_without_it():
    """The bug this component exists for; if a FLARE release fixes it, the component does nothing."""
    wf = workflow("scatter_and_gather", sag(0.05))
    assert getattr(wf.controller.communicator, PRIVATE) == 0.2


def test_start_run_gives_each_workflow_its_own_period():
    workflows = [workflow("scatter_and_gather", sag(0.05)),
                 workflow("cross_site_model_eval", CrossSiteModelEval(task_check_period=0.1))]  # fmt: skip
    start_run(TaskCheckPeriod(), workflows)
    assert [getattr(wf.controller.communicator, PRIVATE) for wf in workflows] == [0.05, 0.1]


def test_reports_what_it_changed_and_leaves_the_rest():
    workflows = [workflow("a", sag(0.05)), workflow("b", sag(0.2))]
    assert apply_periods(workflows) == [("a", 0.2, 0.05)]
    assert apply_periods(workflows) == []  # idempotent


@pytest.mark.parametrize("event", [EventType.END_RUN, EventType.START_WORKFLOW, EventType.ABOUT_TO_START_RUN])
def test_other_events_change_nothing(event):
    """The same context as START_RUN's, the runner in it: only START_RUN applies the periods."""
    wf = workflow("scatter_and_gather", sag(0.05))
    start_run(TaskCheckPeriod(), [wf], event=event)
    assert getattr(wf.controller.communicator, PRIVATE) == 0.2


def test_no_runner_in_the_context_is_no_error():
    fl_ctx = FLContextManager(identity_name="server", job_id="job-1").new_context()
    TaskCheckPeriod().handle_event(EventType.START_RUN, fl_ctx)  # nothing to change, nothing raised


@pytest.mark.parametrize(
    "make",
    [
        lambda: WorkFlow("no communicator", sag(0.05)),  # set_communicator not called
        lambda: SimpleNamespace(id="no controller"),
    ],
)
def test_workflows_it_cannot_fix_are_left_alone(make):
    assert apply_periods([make()]) == []


@pytest.mark.parametrize("bad", [0, -1, True, "0.05", None])
def test_a_period_that_is_not_a_positive_number_is_not_applied(bad):
    wf = workflow("scatter_and_gather", sag(0.05))
    setattr(wf.controller, PRIVATE, bad)
    assert apply_periods([wf]) == []
    assert getattr(wf.controller.communicator, PRIVATE) == 0.2


def test_a_fixed_flare_is_left_as_it_is():
    """A communicator without the private attribute (FLARE renamed or fixed it) is not touched."""
    wf = workflow("scatter_and_gather", sag(0.05))
    delattr(wf.controller.communicator, PRIVATE)
    assert apply_periods([wf]) == []
    assert not hasattr(wf.controller.communicator, PRIVATE)
