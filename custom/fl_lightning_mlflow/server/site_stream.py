"""What the sites stream, from FLARE's analytics data to the sink, on FLARE's event thread.

Per event: the site's budget (common.stream_budget: points over it are counted as throttled,
never journaled nor written), the checks (server.records), a continuation's step shift
(server.continuation), then one append to the write queue. Nothing here waits on MLflow, and
nothing costs more per point when the queue holds a backlog: the writer reads the backlog back
on its own thread (server.spill).
"""

import collections
import time

from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType

from fl_lightning_mlflow.common.protocol import DATASETS, RECORD_KWARG, RECORDS_KWARG, SYSTEM_PREFIX
from fl_lightning_mlflow.common.stream_budget import SERVER_BURST_FACTOR, StreamBudget
from fl_lightning_mlflow.server.records import RecordChecker, _has_values

METRIC_TYPES = (AnalyticsDataType.METRICS, AnalyticsDataType.METRIC, AnalyticsDataType.SCALAR)
TEXT_ITEMS = {AnalyticsDataType.PARAMETERS: "param", AnalyticsDataType.PARAMETER: "param",
              AnalyticsDataType.TAGS: "tag", AnalyticsDataType.TAG: "tag"}  # fmt: skip


def within(records: list, allowed: int) -> tuple:
    """(the records cut to their first `allowed` points, how many of the cut points are system/ ones)."""
    kept, system = [], 0
    for record in records:
        if not _has_values(record):
            kept.append(record)  # malformed: the checker counts it as rejected
            continue
        step, fl_round, values = record
        if allowed >= len(values):
            kept.append(record)
            allowed -= len(values)
            continue
        names = list(values)
        if allowed > 0:
            kept.append([step, fl_round, {k: values[k] for k in names[:allowed]}])
        system += sum(1 for k in names[max(allowed, 0) :] if str(k).startswith(SYSTEM_PREFIX))
        allowed = 0
    return kept, system


class SiteStream:
    def __init__(self, records: RecordChecker, budget_spec=None, warn=print):
        """budget_spec: the tracker's site_budget ({"points_per_second", "burst"}; {}: none)."""
        self.records, self.warn = records, warn
        self.spec = budget_spec
        StreamBudget.parse(budget_spec, "site_budget")  # a bad setting fails the job's start, in one line
        self.budgets: dict = {}  # site -> StreamBudget, made at its first event
        self.throttled = collections.Counter()  # site -> points over its budget (system/ ones apart)
        self.throttled_system = collections.Counter()
        self.continuation = None  # server.continuation, in a resumed job
        self.sink = None

    def budget_of(self, site):
        if site not in self.budgets:
            self.budgets[site] = StreamBudget.parse(self.spec, "site_budget", SERVER_BURST_FACTOR)
        return self.budgets[site]

    def take(self, site: str, data: AnalyticsData) -> None:
        """One analytics event of a site, into the sink."""
        sink = self.sink
        sink.add_site(site)
        kind = data.data_type
        values = data.value if isinstance(data.value, dict) else {data.tag: data.value}
        if (data.kwargs or {}).get(RECORD_KWARG) == DATASETS and kind in TEXT_ITEMS:  # a site's dataset inputs
            sink.datasets(site, self.records.datasets(site, data.value))
        elif kind in METRIC_TYPES:
            records = (data.kwargs or {}).get(RECORDS_KWARG)  # FlareLogger's batch: [[step, round, values], ...]
            if not isinstance(records, list):
                records = [[data.step, None, values]]
            records = self._budgeted(site, records)
            points = self.records.metrics(site, records)
            if self.continuation:
                points = self.continuation.shift(site, points)
            sink.metrics(site, points, int(time.time() * 1000))
        elif kind in TEXT_ITEMS:
            item = TEXT_ITEMS[kind]
            accepted = self.records.texts(site, item, values)
            (sink.site_params if item == "param" else sink.tags)(site, accepted)
        elif kind == AnalyticsDataType.TEXT and data.path:
            sink.text(site, data.value, data.path)
        else:
            self.records.unsupported(site, kind)

    def _budgeted(self, site, records: list) -> list:
        budget = self.budget_of(site)
        if budget is None:
            return records
        total = sum(len(r[2]) for r in records if _has_values(r))
        allowed = budget.take(total)
        if allowed == total:
            return records
        kept, system = within(records, allowed)
        if not self.throttled[site] and not self.throttled_system[site]:
            self.warn(
                f"{site} streams more than its budget ({budget.describe()}): the surplus is counted as "
                "throttled, not written (site_budget in config_fed_server.json)"
            )
        self.throttled[site] += total - allowed - system
        self.throttled_system[site] += system
        return kept
