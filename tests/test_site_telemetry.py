"""What a site streams besides its task results (site.telemetry): events, counts, the dataset
description once, and the state a restarted site process carries on from."""

import json

from nvflare.apis.analytix import AnalyticsData, LogWriterName
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext

from fl_lightning_mlflow.common.protocol import DATASETS, METRICS, METRICS_BATCH, PARAMS, RECORD_KWARG
from fl_lightning_mlflow.site.executor import best_so_far
from fl_lightning_mlflow.site.telemetry import STATE_FILE, SiteTelemetry


class Recording(FLComponent):
    """The component events are fired from, keeping what it fired (FLARE's own event path)."""

    def __init__(self):
        super().__init__()
        self.fired = []

    def fire_event(self, event_type, fl_ctx):
        from nvflare.apis.dxo import from_shareable
        from nvflare.apis.fl_constant import FLContextKey

        dxo = from_shareable(fl_ctx.get_prop(FLContextKey.EVENT_DATA))
        self.fired.append((event_type, dxo))


class Engine:
    tracking = True

    def __init__(self):
        self.described = 0

    def describe_datasets(self):
        self.described += 1
        return {"training": json.dumps({"name": "site-1-train"})}


def test_records_go_out_as_analytics_events_counted_and_the_description_once():
    component = Recording()
    telemetry = SiteTelemetry(component, 0)
    telemetry.fl_ctx = FLContext()
    send = telemetry.sender()
    send(METRICS, {"a": 1.0, "b": 2.0}, 3, 0)
    send(METRICS_BATCH, [[4, 0, {"a": 1.0}], [5, 0, {"a": 2.0, "b": 1.0}]], 5, 0)
    send(PARAMS, {"lr": "0.1"}, None, 0)
    assert telemetry.sent.snapshot() == {"metric": 5, "param": 1, "tag": 0}
    engine = Engine()
    telemetry.send_datasets(engine)
    telemetry.send_datasets(engine)  # once per process
    assert engine.described == 1 and len(component.fired) == 4
    datasets = AnalyticsData.from_dxo(component.fired[-1][1], receiver=LogWriterName.MLFLOW)
    assert datasets.tag == DATASETS and datasets.kwargs[RECORD_KWARG] == DATASETS  # as the tracker reads it
    batch = AnalyticsData.from_dxo(component.fired[1][1], receiver=LogWriterName.MLFLOW)
    assert batch.value == {"a": 2.0, "b": 1.0} and len(batch.kwargs["records"]) == 2  # records ride in kwargs
    assert telemetry.sent.snapshot()["tag"] == 0  # the description is not a point of the delivery account
    engine.tracking = False
    fresh = SiteTelemetry(component, 0)
    fresh.send_datasets(engine)  # an engine that streams nothing sends no description either
    assert engine.described == 1


def test_state_survives_a_restarted_process(tmp_path):
    telemetry = SiteTelemetry(Recording(), 0)
    telemetry.sent.record(METRICS, {"a": 1.0})
    telemetry.save(tmp_path, engine={"step_offset": 40}, best_local=0.5)
    saved = SiteTelemetry.saved(tmp_path)
    assert saved == json.loads((tmp_path / STATE_FILE).read_text())
    assert saved["engine"] == {"step_offset": 40} and saved["best_local"] == 0.5
    restarted = SiteTelemetry(Recording(), 0)
    restarted.resume(saved)
    assert restarted.sent.snapshot()["metric"] == 1  # cumulative across processes
    assert SiteTelemetry.saved(tmp_path / "nowhere") == {} and SiteTelemetry.saved(None) == {}
    assert SiteTelemetry(Recording(), 0).stop_sampler() is False  # none started at 0 s


def test_the_best_local_model_follows_the_key_metric_its_mode_and_missing_values():
    assert best_so_far({"val_mse": 0.3}, "val_mse", "min", 0.5) == (True, 0.3)
    assert best_so_far({"val_mse": 0.7}, "val_mse", "min", 0.5) == (False, 0.5)
    assert best_so_far({"val_acc": 0.7}, "val_acc", "max", 0.5) == (True, 0.7)
    assert best_so_far({}, "val_acc", "max", None) == (True, None)  # nothing measured yet: keep it
    assert best_so_far({"val_acc": float("nan")}, "val_acc", "max", 0.5) == (False, 0.5)
    assert best_so_far({"val_acc": 0.1}, "", "max", 0.9) == (True, 0.9)  # no key metric: the last model
