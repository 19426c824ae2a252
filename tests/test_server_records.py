"""RecordChecker: what a site sends is checked and bounded before MLflow sees it; each problem
is logged once and counted every time."""

from fl_lightning_mlflow.common.protocol import (
    MAX_ITEMS_PER_EVENT,
    MAX_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
)
from fl_lightning_mlflow.server.records import RecordChecker


def checker():
    warnings = []
    return RecordChecker(warn=warnings.append), warnings


def test_good_records_become_points_with_their_steps():
    records, warnings = checker()
    points = records.metrics("site-1", [[0, 0, {"train_loss": 2, "val/acc": 0.5}], (7, 1, {"train_loss": 1.5})])
    assert points == [("train_loss", 2.0, 0), ("val/acc", 0.5, 0), ("train_loss", 1.5, 7)]
    assert records.received["site-1"]["metric"] == 3 and not warnings and not records.rejected


def test_points_without_a_step_count_up_per_site_and_name():
    records, _ = checker()
    steps = [records.metrics("site-1", [[None, None, {"lr": 0.1}]])[0][2] for _ in range(3)]
    assert steps == [0, 1, 2]
    assert records.metrics("site-2", [[None, None, {"lr": 0.1}]])[0][2] == 0


def test_names_mlflow_refuses_are_rejected_logged_once_and_counted_each_time():
    records, warnings = checker()
    long_name = "x" * (MAX_KEY_LENGTH + 1)
    for _ in range(3):
        points = records.metrics("site-1", [[0, 0, {long_name: 1.0, "bad*name": 1.0, "": 1.0, "ok": 1.0}]])
        assert points == [("ok", 1.0, 0)]
    assert len(warnings) == 3 and all(w.startswith("rejected site-1: metric name ") for w in warnings)
    assert any(f"longer than {MAX_KEY_LENGTH} characters" in w for w in warnings)
    assert any("has characters MLflow does not accept" in w for w in warnings)
    assert sorted(records.rejected.values()) == [3, 3, 3]
    assert records.received["site-1"]["metric"] == 3


def test_values_that_are_not_numbers_are_rejected():
    records, warnings = checker()
    assert records.metrics("site-1", [[0, 0, {"a": "0.5", "b": True, "c": None, "d": 1}]]) == [("d", 1.0, 0)]
    assert warnings == [
        "rejected site-1: metric name 'a' has a str value, not a number",
        "rejected site-1: metric name 'b' has a bool value, not a number",
        "rejected site-1: metric name 'c' has a NoneType value, not a number",
    ]


def test_bad_steps_and_malformed_records_are_rejected_and_the_rest_kept():
    records, warnings = checker()
    batch = [
        [-1, 0, {"a": 1}],
        ["3", 0, {"a": 1}],
        [True, 0, {"a": 1}],
        [1, 0],
        "junk",
        [2, 0, ["a"]],
        [4, 0, {"a": 1}],
    ]
    assert records.metrics("site-1", batch) == [("a", 1.0, 4)]
    assert "rejected site-1: metric record has step '-1', not an int >= 0" in warnings
    assert "rejected site-1: metric record has step '3', not an int >= 0" in warnings  # a string, not 3
    assert "rejected site-1: metric record has step 'True', not an int >= 0" in warnings
    assert records.rejected["site-1: metric record is not [step, round, {name: value}]"] == 3


def test_an_event_with_too_many_values_stops_at_the_limit():
    records, warnings = checker()
    half = MAX_ITEMS_PER_EVENT // 2
    batch = [[0, 0, {f"m{i}": 1.0 for i in range(half)}]] * 2 + [[1, 0, {"one": 1.0}]]
    points = records.metrics("site-1", batch)
    assert len(points) == 2 * half  # the third record would exceed the budget: dropped with the rest
    assert warnings == [f"rejected site-1: metric record exceeds {MAX_ITEMS_PER_EVENT} values per event"]


def test_param_and_tag_values_are_cut_to_mlflows_limits_logged_once_per_name():
    records, warnings = checker()
    long_param, long_tag = "p" * (MAX_PARAM_VALUE_LENGTH + 5), "t" * (MAX_TAG_VALUE_LENGTH + 5)
    for _ in range(2):
        params = records.texts("site-1", "param", {"notes": long_param, "lr": 0.01})
    tags = records.texts("site-1", "tag", {"notes": long_tag})
    assert params == [("notes", "p" * MAX_PARAM_VALUE_LENGTH), ("lr", "0.01")]
    assert tags == [("notes", "t" * MAX_TAG_VALUE_LENGTH)]
    assert warnings == [
        f"site-1: param 'notes' value of {MAX_PARAM_VALUE_LENGTH + 5} characters cut to {MAX_PARAM_VALUE_LENGTH} "
        "(MLflow's limit)",
        f"site-1: tag 'notes' value of {MAX_TAG_VALUE_LENGTH + 5} characters cut to {MAX_TAG_VALUE_LENGTH} "
        "(MLflow's limit)",
    ]
    assert sum(records.truncated.values()) == 3
    assert records.received["site-1"] == {"param": 4, "tag": 1}


def test_bad_param_names_and_oversized_events_are_rejected():
    records, warnings = checker()
    assert records.texts("site-1", "param", {"a..b/../c": 1, "ok": 2}) == [("ok", "2")]
    assert records.texts("site-1", "tag", {f"t{i}": i for i in range(MAX_ITEMS_PER_EVENT + 1)}) == []
    assert warnings[-1] == f"rejected site-1: tags event exceeds {MAX_ITEMS_PER_EVENT} values per event"


def test_malformed_events_and_unsupported_kinds_are_counted():
    records, warnings = checker()
    assert records.reject("site-1", "event", None, "is malformed (KeyError: 'kind')")
    assert warnings == ["rejected site-1: event is malformed (KeyError: 'kind')"]
    records.unsupported("site-1", "IMAGE")
    records.unsupported("site-1", "IMAGE")
    assert records.rejected["site-1: unsupported IMAGE"] == 2 and len(warnings) == 1  # counted, not logged
    assert not records.reject("site-1", "metric", "fine_name")


def test_system_metrics_are_written_but_kept_out_of_the_delivery_counts():
    # Sites sample until the job ends, after their last task result reported what they sent.
    records, _ = checker()
    points = records.metrics("site-1", [[3, None, {"system/cpu_utilization_percentage": 50.0, "val_acc": 0.5}]])
    assert points == [("system/cpu_utilization_percentage", 50.0, 3), ("val_acc", 0.5, 3)]
    assert records.received["site-1"]["metric"] == 1 and records.system_received["site-1"] == 1
