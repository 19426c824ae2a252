"""A site's streaming budget: the token bucket both sides keep, its settings refused in one line,
the server's cut of an event over it, and the delivery account's throttled column."""

import pytest

from fl_lightning_mlflow.common.stream_budget import DEFAULT_BUDGET, BudgetError, StreamBudget
from fl_lightning_mlflow.server.delivery import DeliveryLedger
from fl_lightning_mlflow.server.records import RecordChecker
from fl_lightning_mlflow.server.site_stream import SiteStream, within


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
