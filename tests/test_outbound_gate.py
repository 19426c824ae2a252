"""The site's outbound gate (site.outbound) with the disclosure rule (site.disclosure_rule): what
leaves, what is counted as withheld, and that the sent counts count only what left."""

import json
from pathlib import Path

import numpy as np
from nvflare.apis.analytix import AnalyticsData, LogWriterName
from nvflare.apis.fl_context import FLContext

from fl_lightning_mlflow.common.protocol import (
    DATASETS,
    METRICS,
    METRICS_BATCH,
    PARAMS,
    POLICY_DIGEST_TAG,
    POLICY_NAME_TAG,
    POLICY_TRANSFORMS_TAG,
)
from fl_lightning_mlflow.site.disclosure_policy import build
from fl_lightning_mlflow.site.disclosure_rule import DisclosureRule
from fl_lightning_mlflow.site.outbound import OutboundGate, Rule
from fl_lightning_mlflow.site.telemetry import SiteTelemetry
from test_site_telemetry import Recording


def policy(**data):
    return build(data, Path("test_policy.json"))


def gate_with(rng=None, val_samples=100, **data) -> OutboundGate:
    return OutboundGate([DisclosureRule(policy(**data), val_samples=val_samples, rng=rng)])


LOSS_ONLY = dict(name="loss only", metrics={"allow": ["*loss*"]}, datasets={"disclose": "counts"},
                 system_metrics=False)  # fmt: skip


def test_no_rule_lets_everything_out_and_counts_nothing():
    gate = OutboundGate()
    values = {"a": 1.0, "system/cpu": 2.0}
    assert gate.let_out(METRICS, values) == values
    assert gate.let_out(PARAMS, {"lr": "0.1"}) == {"lr": "0.1"}
    assert gate.snapshot() == {}


def test_loss_only_withholds_other_metrics_system_metrics_and_histograms_counting_each():
    gate = gate_with(**LOSS_ONLY)
    assert gate.let_out(METRICS, {"train_loss": 1.0, "val_acc": 0.5, "epoch": 0.0}) == {"train_loss": 1.0}
    batch = [[1, 0, {"val_acc": 0.1}], [2, 0, {"train_loss": 0.9, "system/cpu_utilization_percentage": 3.0}]]
    assert gate.let_out(METRICS_BATCH, batch) == [[2, 0, {"train_loss": 0.9}]]  # the emptied record is gone
    assert gate.let_out(METRICS_BATCH, [[0, None, {"system/cpu_utilization_percentage": 1.0}]]) is None
    described = {"training": json.dumps({"name": "t", "num_samples": 10, "label_histogram": {"0": 7, "1": 3}})}
    out = gate.let_out(DATASETS, described)
    assert json.loads(out["training"]) == {"name": "t", "num_samples": 10, "label_histogram": {}}
    assert gate.snapshot() == {"withheld": {"metric": 3, "param": 0, "tag": 0, "system": 2, "dataset": 1, "text": 0}}


def test_params_and_tags_by_their_patterns_and_datasets_none_or_small_bins_suppressed():
    gate = gate_with(params={"deny": ["data_*"]}, tags={"allow": ["trainer"]}, datasets={"min_label_count": 5})
    assert gate.let_out(PARAMS, {"lr": "0.1", "data_root": "/secret"}) == {"lr": "0.1"}
    assert gate.texts("tag", {"trainer": "x", "host": "y"}) == {"trainer": "x"}
    text = json.dumps({"name": "t", "label_histogram": {"0": 7, "1": 3, "2": 5}})
    assert json.loads(gate.datasets({"training": text})["training"])["label_histogram"] == {"0": 7, "2": 5}
    unchanged = json.dumps({"name": "v", "label_histogram": {"0": 9}}, sort_keys=True)
    assert gate.datasets({"validation": unchanged}) == {"validation": unchanged}
    held = gate.snapshot()["withheld"]
    assert (held["param"], held["tag"], held["dataset"]) == (1, 1, 1)
    none = gate_with(datasets={"disclose": "none"})
    assert none.let_out(DATASETS, {"training": text, "validation": unchanged}) is None
    assert none.snapshot()["withheld"]["dataset"] == 2


def test_validation_metrics_leave_only_with_enough_samples_and_unknown_counts_as_too_few():
    data = dict(metrics={"min_validation_samples": 50})
    assert gate_with(val_samples=49, **data).metrics({"val_acc": 0.9, "global_val_acc": 0.8, "train_loss": 1.0}) == {
        "train_loss": 1.0
    }
    assert gate_with(val_samples=50, **data).metrics({"val_acc": 0.9}) == {"val_acc": 0.9}
    assert gate_with(val_samples=None, **data).metrics({"val_acc": 0.9}) == {}


def test_noise_then_coarsening_change_the_value_that_leaves_never_the_raw_one():
    data = dict(metrics={"noise": {"val_*": {"mechanism": "laplace", "scale": 0.5}}, "coarsen": {"val_*": 0.25}})
    rng = np.random.default_rng(7)
    expected = round((0.8 + np.random.default_rng(7).laplace(0.0, 0.5)) / 0.25) * 0.25
    out = gate_with(rng=rng, **data).metrics({"val_acc": 0.8, "train_loss": 0.123})
    assert out == {"val_acc": expected, "train_loss": 0.123}
    gaussian = gate_with(metrics={"noise": {"a": {"mechanism": "gaussian", "scale": 1.0}}})
    draws = [gaussian.metrics({"a": 0.0})["a"] for _ in range(200)]
    assert 0.5 < np.std(draws) < 1.5 and len(set(draws)) == 200  # fresh noise for every value
    assert gate_with(metrics={"coarsen": {"*": 0.1}}).metrics({"a": 0.4567}) == {"a": 0.5}


def test_text_artifacts_can_be_kept_on_the_site():
    gate = gate_with(text_artifacts=False)
    assert not gate.text("notes.txt") and gate.snapshot()["withheld"]["text"] == 1
    assert gate_with().text("notes.txt")


class Halve(Rule):
    """A later rule (a rate budget, say): every other metric, counted in its own column."""

    column = "throttled"

    def metrics(self, values):
        return dict(list(values.items())[::2])


def test_rules_apply_in_order_each_counting_in_its_own_column_and_counts_resume():
    gate = OutboundGate([DisclosureRule(policy(metrics={"deny": ["b"]})), Halve()])
    assert gate.metrics({"a": 1, "b": 2, "c": 3, "d": 4}) == {"a": 1, "d": 4}
    snapshot = gate.snapshot()
    assert snapshot["withheld"]["metric"] == 1 and snapshot["throttled"]["metric"] == 1
    again = OutboundGate([DisclosureRule(policy()), Halve()])
    again.resume(snapshot | {"unknown": {"metric": 5}})
    assert again.snapshot() == snapshot


class Writer:
    """An mlflow-like writer keeping its calls (FLARE's MLflowWriter fires events instead)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_the_writer_path_is_gated_then_counted_as_sent():
    telemetry = SiteTelemetry(Recording(), 0)
    telemetry.use_policy(policy(**LOSS_ONLY, params={"deny": ["secret"]}, text_artifacts=False))
    inner = Writer()
    writer = telemetry.writer(inner)
    writer.log_metrics({"loss": 1.0, "acc": 0.5}, step=3)
    writer.log_metric("acc", 0.5, step=4)  # nothing left: no call at all
    writer.log_metric("val loss!", 0.7)  # gated by the name MLflow will store
    writer.log_params({"lr": 0.1, "secret": "x"})
    writer.set_tag("trainer", "pt")
    writer.log_text("hello", "notes.txt")
    assert [c[0] for c in inner.calls] == ["log_metrics", "log_metric", "log_params", "set_tag"]
    assert inner.calls[0][1] == ({"loss": 1.0},) and inner.calls[1][2]["key"] == "val loss"
    assert telemetry.sent.snapshot() == {"metric": 2, "param": 1, "tag": 1}
    held = telemetry.gate.snapshot()["withheld"]
    assert (held["metric"], held["param"], held["text"]) == (2, 1, 1)


class Engine:
    tracking = True

    def describe_datasets(self):
        return {"training": json.dumps({"name": "t", "num_samples": 3, "label_histogram": {"0": 3}})}


def test_telemetry_sends_what_the_gate_lets_out_counts_only_that_and_announces_the_policy_once():
    component = Recording()
    telemetry = SiteTelemetry(component, 0)
    telemetry.fl_ctx = FLContext()
    noisy = {"allow": ["*loss*"], "noise": {"x": {"mechanism": "laplace", "scale": 1}}}
    telemetry.use_policy(policy(**{**LOSS_ONLY, "metrics": noisy}))
    send = telemetry.sender()
    send(METRICS, {"train_loss": 1.0, "val_acc": 0.5}, 1, 0)
    send(METRICS, {"val_acc": 0.5}, 2, 0)  # nothing left: no event
    telemetry.send(METRICS_BATCH, [[0, None, {"system/cpu_utilization_percentage": 1.0}]], None, None)
    telemetry.announce_policy(Engine())
    telemetry.announce_policy(Engine())  # once per process
    telemetry.send_datasets(Engine())
    fired = [AnalyticsData.from_dxo(dxo, receiver=LogWriterName.MLFLOW) for _, dxo in component.fired]
    assert [d.value for d in fired[:1]] == [{"train_loss": 1.0}] and len(fired) == 3
    tags = fired[1].value
    assert tags[POLICY_NAME_TAG] == "loss only" and len(tags[POLICY_DIGEST_TAG]) == 16
    assert tags[POLICY_TRANSFORMS_TAG] == "x: laplace noise, scale 1"
    assert json.loads(fired[2].value["training"])["label_histogram"] == {}
    assert telemetry.sent.snapshot() == {"metric": 1, "param": 0, "tag": 3}
    held = telemetry.gate.snapshot()["withheld"]
    assert (held["metric"], held["system"], held["dataset"]) == (2, 1, 1)


def test_the_state_file_carries_the_held_counts_to_a_restarted_process(tmp_path):
    telemetry = SiteTelemetry(Recording(), 0)
    telemetry.use_policy(policy(**LOSS_ONLY))
    telemetry.gate.metrics({"acc": 1.0})
    telemetry.save(tmp_path)
    restarted = SiteTelemetry(Recording(), 0)
    restarted.use_policy(policy(**LOSS_ONLY))
    restarted.resume(SiteTelemetry.saved(tmp_path))
    assert restarted.gate.snapshot() == telemetry.gate.snapshot()


def test_a_policy_from_the_sites_folder_or_none_is_said_in_one_line(tmp_path):
    telemetry = SiteTelemetry(Recording(), 0)
    assert telemetry.load_policy(tmp_path, "site-1") == f"site-1: no disclosure policy in {tmp_path}: " + (
        "everything streamed leaves"
    )
    assert telemetry.policy is None and [type(r).__name__ for r in telemetry.gate.rules] == ["BudgetRule"]
    (tmp_path / "disclosure_policy.site-1.json").write_text(json.dumps({"name": "p1"}))
    line = telemetry.load_policy(tmp_path, "site-1")
    assert line.startswith("site-1: disclosure policy 'p1' (") and line.endswith("disclosure_policy.site-1.json")
