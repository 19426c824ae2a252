"""A site component for tests: site-1 streams names and values MLflow would refuse, beside good ones.

It builds the analytics DXOs by hand, as a faulty or hostile site could, skipping FLARE's
client-side checks. Shipped into a copy of the job's app/custom by the fault tests only.
"""

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType, LogWriterName, TrackConst
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.utils.analytix_utils import send_analytic_dxo

BAD_METRIC_NAMES = ["x" * 300, "bad\nname", "../escape", ""]
GOOD_METRIC = "hostile_ok"
LONG_PARAM = "long_param"


class HostileSite(FLComponent):
    def __init__(self, site: str = "site-1"):
        super().__init__()
        self.site = site
        self.sent = False

    def _send(self, fl_ctx, tag, value, data_type, step=None, **kwargs):
        data = {TrackConst.TRACK_KEY: tag, TrackConst.TRACK_VALUE: value, TrackConst.KWARGS_KEY: kwargs}
        if step is not None:
            data[TrackConst.GLOBAL_STEP_KEY] = step
        dxo = DXO(data_kind=DataKind.ANALYTIC, data=data)
        dxo.set_meta_prop(TrackConst.DATA_TYPE_KEY, data_type)
        dxo.set_meta_prop(TrackConst.TRACKER_KEY, LogWriterName.MLFLOW)
        send_analytic_dxo(self, dxo=dxo, fl_ctx=fl_ctx, event_type=ANALYTIC_EVENT_TYPE)

    def handle_event(self, event_type: str, fl_ctx):
        if event_type != EventType.BEFORE_TASK_EXECUTION or self.sent or fl_ctx.get_identity_name() != self.site:
            return
        self.sent = True
        values = {name: 1.0 for name in BAD_METRIC_NAMES}
        values[GOOD_METRIC] = 1.0
        self._send(fl_ctx, "metrics", values, AnalyticsDataType.METRICS, step=0)
        self._send(fl_ctx, "metrics", {"not_a_number": "abc"}, AnalyticsDataType.METRICS, step=0)
        records = [["abc", 0, {GOOD_METRIC: 2.0}], "not a record", [1, 0, {GOOD_METRIC: 3.0, "y" * 260: 1.0}]]
        self._send(fl_ctx, "metrics_batch", {GOOD_METRIC: 3.0}, AnalyticsDataType.METRICS, records=records)
        self._send(fl_ctx, "params", {LONG_PARAM: "v" * 10_000, "bad param!": 1}, AnalyticsDataType.PARAMETERS)
        self._send(fl_ctx, "tags", {"bad\ttag": "x", "hostile_tag": "ok"}, AnalyticsDataType.TAGS)
        flood = {f"flood_{i}": i for i in range(20_001)}  # more than one event may carry
        self._send(fl_ctx, "params", flood, AnalyticsDataType.PARAMETERS)
