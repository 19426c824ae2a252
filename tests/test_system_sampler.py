"""A site's system metrics: sampled under MLflow's own names, on a thread, with an off switch."""

import threading

import pytest

from fl_lightning_mlflow.site.system_sampler import GpuProbe, SystemSampler, check_interval, sample_system

MLFLOW_NAMES = {
    "system/cpu_utilization_percentage",
    "system/system_memory_usage_megabytes",
    "system/system_memory_usage_percentage",
}


def test_a_sample_has_mlflow_system_metric_names_and_sane_values():
    values = sample_system(GpuProbe())
    assert MLFLOW_NAMES <= set(values)
    # GPU figures only where NVML finds a GPU, under MLflow's names (gpu_<i>_...)
    assert all(k in MLFLOW_NAMES or k.startswith("system/gpu_") for k in values)
    assert 0 <= values["system/cpu_utilization_percentage"] <= 100
    assert 0 < values["system/system_memory_usage_percentage"] <= 100
    assert values["system/system_memory_usage_megabytes"] > 0


def test_the_sampler_sends_numbered_records_until_stopped():
    sent, two = [], threading.Event()

    def send(records):
        sent.extend(records)
        if len(sent) >= 2:
            two.set()

    sampler = SystemSampler(0.05, send, start_step=7)  # a restarted site carries on counting
    sampler.start()
    assert two.wait(10)
    sampler.stop()
    count = len(sent)
    assert [r[0] for r in sent] == list(range(7, 7 + count))
    assert all(r[1] is None and MLFLOW_NAMES <= set(r[2]) for r in sent)
    assert sampler.step == 7 + count
    threading.Event().wait(0.2)
    assert len(sent) == count  # nothing after stop()


def test_zero_seconds_is_off():
    sampler = SystemSampler(0, lambda records: pytest.fail("sent while off"))
    sampler.start()
    assert sampler._thread is None
    sampler.stop()


def test_a_failing_send_is_said_once_and_sampling_goes_on():
    warnings, calls = [], []

    def send(records):
        calls.append(records)
        raise ConnectionError("no FLARE context")

    sampler = SystemSampler(1, send, warn=warnings.append)
    sampler.sample_once()
    sampler.sample_once()
    assert len(calls) == 2 and warnings == ["system metrics: ConnectionError: no FLARE context"]
    assert sampler.step == 0  # what was not sent is not counted


@pytest.mark.parametrize("value", [-1, "10", None, True, 3601])
def test_a_bad_interval_is_one_line_naming_the_setting_and_its_owner(value):
    with pytest.raises(ValueError) as e:
        check_interval("SiteExecutor", value)
    assert str(e.value) == (
        f"SiteExecutor: system_metrics_seconds must be a number of seconds in 0..3600 (0 = off), got {value!r}"
    )
    assert check_interval("SiteExecutor", 0) == 0.0 and check_interval("SiteExecutor", 2.5) == 2.5


def test_the_first_sample_comes_after_a_second_not_after_a_whole_interval():
    """A site of a short job lives less than the default 10 s: its run still gets a sample."""
    first = threading.Event()
    sampler = SystemSampler(3600, lambda records: first.set())
    sampler.start()
    try:
        assert first.wait(30)  # an hour's interval, yet a sample
    finally:
        sampler.stop()
