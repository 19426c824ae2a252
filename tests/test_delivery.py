"""Delivery counted end to end: what a site counts as sent and reports in its task results
(site side), and the server's per-site account of sent / received / written / refused / lost."""

import logging

import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable

from conftest import cifar_engine
from fl_lightning_mlflow.common.protocol import GLOBAL_PREFIX, METRICS, METRICS_BATCH, PARAMS, SENT_COUNTS_META
from fl_lightning_mlflow.server.delivery import DeliveryLedger
from fl_lightning_mlflow.server.records import RecordChecker
from fl_lightning_mlflow.site.engine import SiteContext
from fl_lightning_mlflow.site.executor import with_sent_counts
from fl_lightning_mlflow.site.flare_logger import SentCounter
from test_site_engines import BATCH, LOG_EVERY, Sink, global_weights


# ----- the server's ledger ------------------------------------------------------------------------
def test_an_exact_match_is_one_short_line():
    ledger = DeliveryLedger()
    for site in ("site-2", "site-1"):
        assert ledger.report(site, {"metric": 50, "param": 14, "tag": 0})
    received = {s: {"metric": 50, "param": 14} for s in ("site-1", "site-2")}
    table = ledger.table(received, written={"site-1": 64, "site-2": 64}, refused={}, rejected={})
    assert ledger.complete(table)
    assert ledger.message(table) == "delivery: site-1 sent 64, written 64; site-2 sent 64, written 64"
    row = table["site-1"]
    assert row | {"sent_by_kind": None, "received_by_kind": None} == {
        **dict(sent=64, throttled=0, received=64, rejected=0, written=64, refused=0, lost=0, in_flight=0),
        **dict(sent_by_kind=None, received_by_kind=None, withheld=None),  # no held counts reported
    }
    assert row["sent_by_kind"] == {"metric": 50, "param": 14, "tag": 0}
    metrics = dict(ledger.metrics(table))
    assert metrics["delivery/site-1/sent"] == metrics["delivery/site-1/written"] == 64.0
    assert metrics["delivery/site-2/lost"] == 0.0


def test_counts_are_cumulative_so_the_largest_report_wins_and_bad_reports_are_ignored():
    ledger = DeliveryLedger()
    assert ledger.report("site-1", {"metric": 30, "param": 14})
    assert ledger.report("site-1", {"metric": 60, "param": 14})
    assert ledger.report("site-1", {"metric": 30, "param": 14})  # a late result of an earlier round
    for bad in (None, [1, 2], {"metric": -1}, {"metric": "5"}, {"metric": True}, {"other": 3}, {}):
        assert not ledger.report("site-1", bad)
    assert not ledger.report("", {"metric": 1})
    assert ledger.sent == {"site-1": {"metric": 60, "param": 14, "tag": 0}}


def test_what_is_missing_is_one_line_with_every_number():
    ledger = DeliveryLedger()
    ledger.report("site-1", {"metric": 100, "param": 10})
    ledger.report("site-2", {"metric": 50})
    # site-1: 5 events' points never arrived, 2 were rejected by the server's checks, 3 refused by
    # MLflow, 4 still unwritten at the end; site-2: all there.
    received = {"site-1": {"metric": 93, "param": 10}, "site-2": {"metric": 50}}
    table = ledger.table(received, {"site-1": 96, "site-2": 50}, {"site-1": 3}, {"site-1": 2})
    assert not ledger.complete(table)
    row = table["site-1"]
    assert (row["sent"], row["received"], row["rejected"], row["written"], row["refused"]) == (110, 103, 2, 96, 3)
    assert row["lost"] == 110 - 96 - 3 - 2 and row["in_flight"] == 110 - 103 - 2
    assert ledger.message(table) == (
        "delivery: site-1 sent 110, received 103, rejected 2, written 96, refused 3, lost 9 "
        "(5 never reached the server: events lost on the way or still in flight); site-2 sent 50, written 50"
    )
    assert dict(ledger.metrics(table))["delivery/site-1/lost"] == 9.0


def test_unknowns_are_said_not_counted_as_losses():
    ledger = DeliveryLedger()
    ledger.report("site-1", {"metric": 10})
    # a write queue without per-run counters; a site that never reported (no task result)
    table = ledger.table({"site-1": {"metric": 10}, "site-3": {"metric": 4}}, written=None)
    assert ledger.complete(table)
    assert table["site-1"]["lost"] is None and table["site-3"]["sent"] is None
    message = ledger.message(table)
    assert "site-1 sent 10, written ? (not counted per run by the write queue)" in message
    assert "site-3 sent ?" in message and "no task result reported its counts" in message
    assert "delivery/site-1/written" not in dict(ledger.metrics(table))
    # more written than reported: sent after the last task result, not a loss
    table = ledger.table({"site-1": {"metric": 12}}, written={"site-1": 12})
    assert table["site-1"]["lost"] == 0 and "after its last task result" in ledger.message(table)
    assert ledger.message({}) == "delivery: no site reported what it sent"


def test_the_checker_counts_rejected_values_per_site():
    checker = RecordChecker(warn=lambda line: None)
    checker.metrics("site-1", [[0, 0, {"ok": 1.0, "bad name!": 2.0}], [-1, 0, {"a": 1.0, "b": 2.0}], "junk"])
    checker.texts("site-1", "param", {"lr": 0.1, "": "x"})
    assert checker.received["site-1"] == {"metric": 1, "param": 1}
    assert checker.rejected_items == {"site-1": 1 + 2 + 1 + 1}


# ----- the site's count ----------------------------------------------------------------------------
def test_the_counter_counts_what_each_path_handed_on_and_carries_on_after_a_restart():
    handed = []
    counter = SentCounter()
    send = counter.sender(lambda *args: handed.append(args))
    send(METRICS, {"a": 1.0, "b": 2.0}, 0, 0)
    send(METRICS_BATCH, [[1, 0, {"a": 1.0}], [2, 0, {"a": 2.0, "b": 1.0}]], 2, 0)
    send(PARAMS, {"lr": "0.1"}, None, 0)
    writer = counter.writer(Sink())
    writer.log_metrics({"x": 1.0, "y": 2.0}, step=3)
    writer.log_metric("x", 1.0, step=4)
    writer.log_params({"a": 1, "b": 2})
    writer.set_tags({"trainer": "loop"})
    assert len(handed) == 3 and writer.series["x"] == [(3, 1.0), (4, 1.0)]  # passed through
    assert counter.snapshot() == {"metric": 2 + 3 + 3, "param": 1 + 2, "tag": 1}

    def failing(*args):
        raise RuntimeError("not handed on")

    with pytest.raises(RuntimeError):
        counter.sender(failing)(METRICS, {"a": 1.0}, 5, 0)
    assert counter.snapshot()["metric"] == 8  # a call that raised sent nothing
    restarted = SentCounter({"metric": 8, "param": 3, "tag": 1, "junk": 5, "tag2": "x"})
    assert restarted.snapshot() == {"metric": 8, "param": 3, "tag": 1}


@pytest.mark.parametrize("kind", ["lightning", "pt"])
def test_the_train_result_of_a_real_engine_run_carries_what_was_sent(kind, offline_data, tmp_path):
    """The executor's train task, as far as FLARE is not needed: the counting sender or writer,
    one round, the logger flushed, the counts in the result's meta equal what arrived."""
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    sink, counter = Sink(), SentCounter()
    args = {"metrics_flush_seconds": 3600.0} if kind == "lightning" else {}  # only a flush sends
    engine = cifar_engine(kind, offline_data, batch_size=BATCH, log_every_n_steps=LOG_EVERY, **args)
    # what the executor hands the engine: its sender and the log writer, both counted
    engine.setup(SiteContext("site-1", tmp_path, 1, send=counter.sender(sink), writer=counter.writer(sink)))
    start = global_weights(3)
    engine.evaluate(start, None, fl_round=0, log_prefix=GLOBAL_PREFIX)
    fit = engine.fit(start, 0, None)
    engine.flush()  # as the executor does before counting
    dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data={k: v - start[k] for k, v in fit.weights.items()})
    dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, fit.samples)
    counts = from_shareable(with_sent_counts(dxo, counter.snapshot()).to_shareable()).get_meta_prop(SENT_COUNTS_META)
    assert counts["metric"] == sink.points() == engine.points_sent > 0
    assert counts["param"] == len(sink.params) == 15  # each param once
    assert counts["tag"] == len(sink.tags)
    # the server's side of the same numbers: nothing lost
    ledger = DeliveryLedger()
    assert ledger.report("site-1", counts)
    total = sink.points() + len(sink.params) + len(sink.tags)
    table = ledger.table({"site-1": {"metric": sink.points(), "param": 15, "tag": len(sink.tags)}}, {"site-1": total})
    assert ledger.complete(table) and table["site-1"]["sent"] == total


def test_what_a_sites_policy_withheld_is_a_column_beside_the_balance_and_on_the_parent_run():
    ledger = DeliveryLedger()
    ledger.report("site-1", {"metric": 40, "param": 2, "tag": 2})
    held = {"metric": 30, "param": 0, "tag": 0, "system": 12, "dataset": 2, "text": 0}
    assert ledger.report_held("site-1", {"withheld": held, "unknown_rule": {"metric": 1}})
    assert ledger.report_held("site-1", {"withheld": {**held, "metric": 10}})  # a late, smaller report
    for bad in (None, {"withheld": {"metric": -1}}, {"withheld": 3}, {"other": {"metric": 1}}):
        assert not ledger.report_held("site-1", bad)
    ledger.report("site-2", {"metric": 50})
    received = {"site-1": {"metric": 40, "param": 2, "tag": 2}, "site-2": {"metric": 50}}
    table = ledger.table(received, {"site-1": 44, "site-2": 50}, {}, {})
    assert ledger.complete(table)  # withheld was never sent: the account balances without it
    assert table["site-1"]["withheld"] == 44 and table["site-1"]["withheld_by_kind"] == held
    assert table["site-2"]["withheld"] is None  # it reported no held counts
    assert ledger.message(table) == "delivery: site-1 sent 44, written 44, withheld 44; site-2 sent 50, written 50"
    metrics = dict(ledger.metrics(table))
    assert metrics["delivery/site-1/withheld"] == 44.0 and metrics["delivery/site-1/withheld/system"] == 12.0
    assert "delivery/site-1/withheld/param" not in metrics and "delivery/site-2/withheld" not in metrics
