"""A site component for tests: logs through FLARE's own MLflowWriter as a FLARE user writes it.

A param and a tag that the user names "datasets", a metric logged without a step (twice), and a
metric whose name MLflow refuses, sent straight through the writer (no cleaning of ours on that
path: the server must count it). Shipped into a copy of the job's app/custom by the tests only.
"""

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent

NO_STEP_METRIC = "user_no_step"
REFUSED_METRIC = "acc@top1"


class FlareUserSite(FLComponent):
    def __init__(self, writer_id: str = "mlflow_writer"):
        super().__init__()
        self.writer_id = writer_id
        self.sent = False

    def handle_event(self, event_type: str, fl_ctx):
        if event_type != EventType.BEFORE_TASK_EXECUTION or self.sent:
            return
        self.sent = True
        writer = fl_ctx.get_engine().get_component(self.writer_id)
        writer.set_tag("datasets", "cifar10")
        writer.log_param("datasets", "cifar10-v2")
        writer.log_metric(NO_STEP_METRIC, 1.0)
        writer.log_metric(NO_STEP_METRIC, 2.0)
        writer.log_metrics({REFUSED_METRIC: 0.5, "user_ok": 0.5}, step=0)
