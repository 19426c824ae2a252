"""A Lightning Logger that turns every self.log(...) into a FLARE analytics record.

The Lightning engine hands it the executor's `send(kind, values, step, round)` callable, which
fires the FLARE event; ConvertToFedEvent forwards it to the server, where MLflowReceiver
writes it (record kinds and limits: common.protocol).
Keeping FLARE out of this class keeps its step arithmetic testable on its own.

Steps: Lightning restarts its step count with every Trainer and every validate() call.
MLflow needs one axis per metric that only moves forward, so the logger adds the number
of training batches run in earlier rounds (`step_offset`) and, should a key still repeat
a step, moves it one past its last one. Hyperparameters go out once each, flattened as
Lightning's MLFlowLogger flattens them, as params, in chunks MLflow accepts. A metric name MLflow
would refuse is cleaned here, on the site, with a warning in the site's log (mlflow_name).
"""

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping

# Lightning's own hyperparameter flattening, which its MLFlowLogger uses: the same keys.
from lightning_fabric.utilities.logger import _convert_params, _flatten_dict
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from fl_lightning_mlflow.common.protocol import (
    MAX_PARAM_VALUE_LENGTH,
    METRICS,
    METRICS_BATCH,
    PARAMS,
    SENT_KINDS,
    TAGS,
    check_key,
    clean_key,
)
from fl_lightning_mlflow.common.protocol import MAX_PARAMS_PER_BATCH as MAX_PARAMS_PER_RECORD

__all__ = [
    "FlareLogger",
    "SentCounter",
    "flatten",
    "METRICS",
    "METRICS_BATCH",
    "PARAMS",
    "MAX_PARAMS_PER_RECORD",
    "Sender",
]

Sender = Callable[[str, dict, int | None, int | None], None]
log = logging.getLogger(__name__)


def flatten(params) -> dict:
    """Hyperparameters as Lightning's MLFlowLogger sends them, the same keys: nested mappings,
    dataclasses, namespaces and lists of mappings flattened with "/" ({"a": {"b": 1}} -> "a/b",
    {"dl": [{"a": 1}]} -> "dl/0/a"), by Lightning's own functions; values as MLflow stores them
    (strings, cut to its limit)."""
    return {k: str(v)[:MAX_PARAM_VALUE_LENGTH] for k, v in _flatten_dict(_convert_params(params)).items()}


_warned_names: set = set()


def mlflow_name(key: str) -> str:
    """The metric's name as MLflow accepts it (common.protocol.clean_key), with one warning per
    name in the site's log when it had to be changed: the person training sees why, where
    Lightning's MLFlowLogger would have warned."""
    name = clean_key(key)
    if name != key and key not in _warned_names:
        _warned_names.add(key)
        log.warning(f"metric name {str(key)[:80]!r} is one MLflow refuses ({check_key(key)}); sent as {name[:80]!r}")
    return name


class FlareLogger(Logger):
    def __init__(self, send: Sender, site: str = "site", flush_seconds: float = 0.0):
        """flush_seconds > 0: gather records and send them as one METRICS_BATCH every that many
        seconds and whenever Lightning finalizes a stage (per-step metrics cost one FLARE event a
        second, not one a step). 0: one METRICS record per log call."""
        super().__init__()
        self.flush_seconds = flush_seconds
        self._pending: list = []
        self._last_flush = time.monotonic()
        self._send = send
        self._site = site
        self.round: int | None = None
        self.step_offset = 0  # training batches run before the current Trainer
        self.epoch_offset = 0  # local epochs run before the current Trainer
        self.key_prefix = ""  # e.g. "global_" while validating the received global model
        self._last_step: dict = {}
        self._sent_params: dict = {}
        self.points_sent = 0  # metric values handed to FLARE, for end-to-end accounting

    @property
    def name(self) -> str:
        return "flare"

    @property
    def version(self) -> str:
        return self._site

    def advance(self, batches: int, epochs: int) -> None:
        """Called after each local fit so the next round continues the step axis."""
        self.step_offset += batches
        self.epoch_offset += epochs

    def map_step(self, keys, step: int | None) -> int:
        """The step to send: offset + Lightning's step, moved past any step these keys already used."""
        out = self.step_offset + (step or 0)
        for key in keys:
            last = self._last_step.get(key)
            if last is not None and out <= last:
                out = last + 1
        for key in keys:
            self._last_step[key] = out
        return out

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        values = {mlflow_name(f"{self.key_prefix}{k}"): float(v) for k, v in metrics.items() if k != "epoch"}
        if not values:
            return
        out = self.map_step(values, step)
        # Lightning adds its per-Trainer "epoch" to most records; continue it across rounds,
        # sent only where it advances its own axis (a validate() call repeats the last one).
        if "epoch" in metrics and out > self._last_step.get("epoch", -1):
            values["epoch"] = float(metrics["epoch"]) + self.epoch_offset
            self._last_step["epoch"] = out
        self.points_sent += len(values)
        if self.flush_seconds <= 0:
            self._send(METRICS, values, out, self.round)
            return
        self._pending.append([out, self.round, values])
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Send the gathered records now (also called at the end of every Lightning stage)."""
        if self._pending:
            records, self._pending = self._pending, []
            self._send(METRICS_BATCH, records, records[-1][0], self.round)
        self._last_flush = time.monotonic()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.flush()

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        new = {k: v for k, v in flatten(params).items() if self._sent_params.get(k) != v}
        self._sent_params.update(new)
        items = sorted(new.items())
        for i in range(0, len(items), MAX_PARAMS_PER_RECORD):
            self._send(PARAMS, dict(items[i : i + MAX_PARAMS_PER_RECORD]), None, self.round)


class SentCounter:
    """What a site has handed to FLARE for the server, by kind (common.protocol.SENT_KINDS),
    cumulative: the count its task results report (SENT_COUNTS_META) so the server can tell
    what was lost on the way. It sits where records leave the engine, on both paths: the
    executor's sender (FlareLogger's records) and the log writer (FLARE's MLflowWriter, which
    fires its own events). Counted once the call returns: a call that raised sent nothing."""

    def __init__(self, start: Mapping | None = None):
        """start: the counts an earlier process of this site reported (its state file)."""
        self.counts = collections.Counter()
        # The system-metrics thread counts beside the task's: += on a Counter is not atomic.
        self._lock = threading.Lock()
        for kind, n in (start or {}).items():
            if kind in SENT_KINDS and isinstance(n, int) and not isinstance(n, bool) and n > 0:
                self.counts[kind] = n

    def snapshot(self) -> dict:
        """{kind: count} for every kind, as the task result carries it (JSON-able, a copy)."""
        with self._lock:
            return {kind: self.counts[kind] for kind in SENT_KINDS}

    def record(self, kind: str, values) -> None:
        """Count one sender call: METRICS {name: value}, METRICS_BATCH [[step, round, {..}]], PARAMS
        or TAGS {..}."""
        with self._lock:
            self._record(kind, values)

    def _record(self, kind: str, values) -> None:
        if kind == METRICS:
            self.counts["metric"] += len(values)
        elif kind == METRICS_BATCH:
            self.counts["metric"] += sum(len(r[2]) for r in values)
        elif kind == PARAMS:
            self.counts["param"] += len(values)
        elif kind == TAGS:
            self.counts["tag"] += len(values)

    def sender(self, send: Sender) -> Sender:
        """send, counting what it was handed."""

        def counted(kind, values, step, fl_round):
            send(kind, values, step, fl_round)
            self.record(kind, values)

        return counted

    def writer(self, writer):
        """writer (mlflow-like: log_metric(s), log_param(s), set_tag(s)), counting those calls."""
        return _CountingWriter(writer, self.counts)


class _CountingWriter:
    """An mlflow-like writer passed through, each point counted (anything else goes straight on)."""

    def __init__(self, writer, counts: collections.Counter):
        self._writer, self._counts = writer, counts

    def __getattr__(self, name):  # log_text and the rest: not points, not counted
        return getattr(self._writer, name)

    def log_metric(self, key, value, step=None):
        self._writer.log_metric(key=mlflow_name(key), value=value, step=step)
        self._counts["metric"] += 1

    def log_metrics(self, metrics, step=None):
        self._writer.log_metrics({mlflow_name(k): v for k, v in metrics.items()}, step=step)
        self._counts["metric"] += len(metrics)

    def log_param(self, key, value):
        self._writer.log_param(key, value)
        self._counts["param"] += 1

    def log_params(self, values):
        self._writer.log_params(values)
        self._counts["param"] += len(values)

    def set_tag(self, key, tag):
        self._writer.set_tag(key, tag)
        self._counts["tag"] += 1

    def set_tags(self, tags):
        self._writer.set_tags(tags)
        self._counts["tag"] += len(tags)
