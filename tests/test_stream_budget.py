"""A site's streaming budget: the token bucket both sides keep, its settings refused in one line,
the server's cut of an event over it, and the delivery account's throttled column."""

import pytest

from fl_lightning_mlflow.common.stream_budget import DEFAULT_BUDGET, BudgetError, StreamBudget
from fl_lightning_mlflow.server.delivery import DeliveryLedger
from fl_lightning_mlflow.server.records import RecordChecker
from fl_lightning_mlflow.server.site_stream import SiteStream, within
from test_site_telemetry import Recording


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_burst_goes_through_then_the_rate_holds_and_the_rest_is_counted():
    clock = Clock()
    budget = StreamBudget(100, 1000, clock=clock)
    assert budget.take(800) == 800 and budget.take(800) == 200 and budget.throttled == 600
    clock.now = 2.0  # two seconds refill 200 points
    assert budget.take(500) == 200 and budget.throttled == 900
    clock.now = 1000.0  # never more than the burst saved up
    assert budget.take(5000) == 1000


def test_the_default_is_generous_and_a_budget_can_be_switched_off():
    budget = StreamBudget.parse(None, "stream_budget")
    assert (budget.rate, budget.burst) == (DEFAULT_BUDGET["points_per_second"], DEFAULT_BUDGET["burst"])
    assert StreamBudget.parse({}, "stream_budget") is None
    assert StreamBudget.parse({"points_per_second": 0}, "stream_budget") is None
    assert StreamBudget.parse({"points_per_second": 10, "burst": 5}, "site_budget", 2).burst == 10


@pytest.mark.parametrize(
    "spec, says",
    [
        ([1, 2], "site_budget must be an object"),
        ({"points_per_second": 10, "bursts": 5}, "site_budget must be an object"),
        ({"points_per_second": "fast"}, "site_budget.points_per_second must be a number > 0"),
        ({"points_per_second": 10, "burst": -1}, "site_budget.burst must be a number > 0"),
        ({"points_per_second": True}, "site_budget.points_per_second must be a number > 0"),
    ],
)
def test_a_bad_setting_is_refused_in_one_line_naming_it(spec, says):
    with pytest.raises(BudgetError, match=says):
        StreamBudget.parse(spec, "site_budget")


def test_an_event_over_budget_keeps_its_first_points_and_counts_system_ones_apart():
    records = [[0, 0, {"a": 1.0, "b": 2.0}], [1, 0, {"a": 1.0, "system/cpu": 5.0, "b": 2.0}], "junk"]
    kept, system = within(records, 3)
    assert kept == [[0, 0, {"a": 1.0, "b": 2.0}], [1, 0, {"a": 1.0}], "junk"] and system == 1
    assert within(records, 10) == (records, 0)


class Sink:
    def __init__(self):
        self.points = []

    def add_site(self, site):
        pass

    def metrics(self, site, points, now):
        self.points += points


def test_the_server_drops_what_arrives_over_a_sites_budget_and_says_so_once():
    from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType

    said = []
    stream = SiteStream(RecordChecker(warn=said.append), {"points_per_second": 1, "burst": 5}, warn=said.append)
    stream.sink = Sink()
    for step in range(3):
        values = {f"layer{i}": 0.5 for i in range(6)}
        data = AnalyticsData(key="m", value=values, data_type=AnalyticsDataType.METRICS, step=step)
        stream.take("site-3", data)
    assert len(stream.sink.points) == 10  # twice the site's burst: what its own budget lets out always arrives
    assert stream.throttled["site-3"] == 8 and len([s for s in said if "more than its budget" in s]) == 1


def test_the_delivery_account_has_a_throttled_column_and_loses_nothing_for_it():
    ledger = DeliveryLedger()
    ledger.report("site-3", {"metric": 120, "param": 0, "tag": 0})
    ledger.report_held("site-3", {"throttled": {"metric": 1000}})  # held back by the site's own budget
    table = ledger.table({"site-3": {"metric": 100}}, {"site-3": 100}, throttled={"site-3": 20})
    row = table["site-3"]
    assert (row["sent"], row["throttled"], row["written"], row["lost"], row["in_flight"]) == (120, 1020, 100, 0, 0)
    assert "throttled 1020" in ledger.message(table)
    assert ("delivery/site-3/throttled", 1020.0) in ledger.metrics(table)


def test_the_site_holds_back_what_is_over_its_budget_and_counts_it_throttled():
    from nvflare.apis.fl_context import FLContext

    from fl_lightning_mlflow.common.protocol import METRICS_BATCH
    from fl_lightning_mlflow.site.telemetry import SiteTelemetry

    component = Recording()
    telemetry = SiteTelemetry(component, 0, {"points_per_second": 1, "burst": 25_000})
    telemetry.fl_ctx = FLContext()
    send = telemetry.sender()
    records = [[step, 0, {f"layer{i}": 0.5 for i in range(1000)}] for step in range(30)]  # a burst of 30,000
    send(METRICS_BATCH, records, 29, 0)
    from nvflare.apis.analytix import AnalyticsData, LogWriterName

    events = [AnalyticsData.from_dxo(dxo, receiver=LogWriterName.MLFLOW) for _, dxo in component.fired]
    sent = sum(len(r[2]) for data in events for r in data.kwargs["records"])
    assert sent == telemetry.sent.snapshot()["metric"] == 25_000
    assert telemetry.gate.snapshot()["throttled"]["metric"] == 5_000
    assert len(component.fired) == 2  # in events of at most MAX_ITEMS_PER_EVENT (20,000) values
    # The task results' metrics (the server's model selection) are not budgeted.
    assert telemetry.gate.result_metrics({"global_val_acc": 0.5}) == {"global_val_acc": 0.5}


def test_a_site_budget_that_is_not_one_is_refused_in_one_line():
    from fl_lightning_mlflow.site.telemetry import SiteTelemetry

    with pytest.raises(BudgetError, match="SiteExecutor.stream_budget.burst must be a number > 0"):
        SiteTelemetry(Recording(), 0, {"points_per_second": 5, "burst": "big"})


def test_records_are_sent_in_events_the_server_takes_whole():
    from fl_lightning_mlflow.site.telemetry import chunks

    records = [[s, 0, {"a": 1, "b": 2, "c": 3}] for s in range(5)]
    assert [len(c) for c in chunks(records, 7)] == [2, 2, 1]
    assert [len(c) for c in chunks([[0, 0, {str(i): i for i in range(9)}]], 7)] == [1]  # a record stays whole
