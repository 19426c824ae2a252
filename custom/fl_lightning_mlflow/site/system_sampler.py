"""A site's CPU, memory and GPU use, sampled on a thread and handed on as metric records.

MLflow's own system-metrics sampler writes to the tracking server from the training process,
which a site must never reach; this one only samples, under the same names
(common.protocol.SYSTEM_PREFIX + MLflow's), and hands [step, None, {name: value}] records to a
sender, which the executor turns into FLARE events for the server. psutil comes with MLflow;
GPU figures only where pynvml imports and finds a GPU.
"""

import threading
from collections.abc import Callable

from fl_lightning_mlflow.common.protocol import SYSTEM_PREFIX

MEGABYTE = 1024 * 1024
FIRST_SAMPLE_SECONDS = 1.0  # the first sample's delay, however long the interval


def check_interval(owner: str, seconds) -> float:
    """system_metrics_seconds: a number >= 0 (0 = off); one ValueError line otherwise."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 3600:
        raise ValueError(f"{owner}: system_metrics_seconds must be a number of seconds in 0..3600 (0 = off), "
                         f"got {seconds!r}")  # fmt: skip
    return float(seconds)


class GpuProbe:
    """NVML's view of the GPUs, or nothing where pynvml or a GPU is missing."""

    def __init__(self):
        self.nvml, self.handles = None, []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.nvml = pynvml
        except Exception:  # noqa: BLE001 - no pynvml, no driver, no GPU: CPU and memory only
            self.handles = []

    def sample(self) -> dict:
        out = {}
        for i, handle in enumerate(self.handles):
            try:
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                out[f"gpu_{i}_utilization_percentage"] = float(self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                out[f"gpu_{i}_memory_usage_megabytes"] = memory.used / MEGABYTE
                out[f"gpu_{i}_memory_usage_percentage"] = 100.0 * memory.used / memory.total if memory.total else 0.0
            except Exception:  # noqa: BLE001, S112 - one GPU's reading failed: the others and the CPU still count
                continue
        return out


def sample_system(gpu: GpuProbe | None = None) -> dict:
    """One sample under MLflow's system-metric names: {"system/<name>": value}."""
    import psutil

    memory = psutil.virtual_memory()
    values = {
        "cpu_utilization_percentage": psutil.cpu_percent(interval=None),  # since the previous call
        "system_memory_usage_megabytes": (memory.total - memory.available) / MEGABYTE,
        "system_memory_usage_percentage": memory.percent,
    }
    if gpu is not None:
        values.update(gpu.sample())
    return {SYSTEM_PREFIX + name: float(value) for name, value in values.items()}


class SystemSampler:
    """Every `seconds`, one sample handed to `send([[index, None, values]])` on its own thread.
    The step is the sample's index, continued from `start_step` (a restarted site carries on)."""

    def __init__(self, seconds: float, send: Callable[[list], None], start_step: int = 0, warn=None):
        self.seconds, self.send, self.step = seconds, send, start_step
        self.points_sent = 0  # by this process (the END_RUN line's count)
        self.warn = warn or (lambda msg: None)
        self._stop = threading.Event()
        self._thread = None
        self._gpu = None

    def start(self) -> None:
        if self.seconds <= 0 or self._thread is not None:
            return
        import psutil

        psutil.cpu_percent(interval=None)  # the first reading is meaningless; it starts the interval
        self._gpu = GpuProbe()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # The first sample comes after FIRST_SAMPLE_SECONDS (CPU use over that second), not after
        # a whole interval: a site of a short job lives less than the default 10 s past its start,
        # and its run's System metrics tab would stay empty.
        wait = min(self.seconds, FIRST_SAMPLE_SECONDS)
        while not self._stop.wait(wait):
            self.sample_once()
            wait = self.seconds

    def sample_once(self) -> None:
        """Sample and send; a failure is said once and sampling goes on (training never stops for it)."""
        try:
            values = sample_system(self._gpu)
            self.send([[self.step, None, values]])
            self.step += 1
            self.points_sent += len(values)
        except Exception as e:  # noqa: BLE001 - system metrics are a service, never the site's failure
            self.warn(f"system metrics: {type(e).__name__}: {e}")
            self.warn = lambda msg: None

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
