"""The site's outbound gate: everything the site streams passes it before it leaves the site.

SiteTelemetry.send (FlareLogger's records, the dataset description, the system sampler's series,
the task results' metrics) and the MLflowWriter a job logs through (gated_writer) both ask the
gate what may leave. The gate holds a list of rules, applied in order; each takes what the one
before let out and returns what it lets out. What a rule held back is counted per kind
(common.protocol.HELD_KINDS) in the rule's own column (Rule.column, e.g. "withheld"), never its
values: the counts ride in every task result (HELD_COUNTS_META) beside the sent counts, which
count only what the gate let out, so the server's delivery account still balances.

A new rule (a rate budget, say) subclasses Rule, overrides what it governs and is added with
OutboundGate.add; the rest is passed through as it is. Pure Python: no FLARE.
"""

import collections
import json
import threading

from fl_lightning_mlflow.common.protocol import (
    DATASETS,
    HELD_KINDS,
    METRICS,
    METRICS_BATCH,
    PARAMS,
    SYSTEM_PREFIX,
    TAGS,
    clean_key,
)

TEXT_ITEMS = {PARAMS: "param", TAGS: "tag"}


class Rule:
    """One outbound rule: each method gets what may leave so far and returns what may leave after
    it (the base class lets everything out). column: the delivery table's column its holds go to."""

    column = "held"
    streams_only = False  # True: task results' metrics (what the server's selector reads) pass it untouched

    def metrics(self, values: dict) -> dict:
        """{name: number} of one step (system metrics under common.protocol.SYSTEM_PREFIX too)."""
        return values

    def texts(self, item: str, values: dict) -> dict:
        """item "param" or "tag"; {name: text}."""
        return values

    def dataset(self, context: str, info: dict) -> dict | None:
        """One dataset description (common.protocol.DATASET_FIELDS); None: it does not leave."""
        return info

    def text(self, artifact_path: str) -> bool:
        """Whether a text artifact (MLflowWriter.log_text) may leave."""
        return True


class OutboundGate:
    def __init__(self, rules=(), columns=()):
        """columns: counted (as 0) even before a rule of theirs is added: a site without a policy
        reports "withheld 0", not nothing."""
        self.rules: list = []
        # column -> Counter(kind -> count), cumulative since the job started
        self.held: dict = {column: collections.Counter() for column in columns}
        # The system sampler's thread passes the gate beside the task's: one at a time.
        self._lock = threading.Lock()
        for rule in rules:
            self.add(rule)

    def add(self, rule: Rule, first: bool = False) -> None:
        """Apply rule after the others (first: before them)."""
        self.rules.insert(0, rule) if first else self.rules.append(rule)
        self.held.setdefault(rule.column, collections.Counter())

    # ----- the counts -------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """{column: {kind: count}} for every rule's column, as the task results carry it (a copy)."""
        with self._lock:
            return {column: {kind: held[kind] for kind in HELD_KINDS} for column, held in self.held.items()}

    def resume(self, saved) -> None:
        """Carry on from the counts an earlier process of this site saved (its state file)."""
        for column, counts in (saved or {}).items():
            if column in self.held and isinstance(counts, dict):
                for kind, n in counts.items():
                    if kind in HELD_KINDS and isinstance(n, int) and not isinstance(n, bool) and n > 0:
                        self.held[column][kind] = n

    # ----- what may leave ------------------------------------------------------------------------
    def let_out(self, kind: str, values):
        """A sender's record (common.protocol's kinds) as it may leave, or None: nothing does."""
        if kind == METRICS:
            out = self.metrics(values)
        elif kind == METRICS_BATCH:
            out = self.records(values)
        elif kind in TEXT_ITEMS:
            out = self.texts(TEXT_ITEMS[kind], values)
        elif kind == DATASETS:
            out = self.datasets(values)
        else:
            out = values
        return out or None

    def metrics(self, values: dict) -> dict:
        with self._lock:
            return self._metrics(values)

    def result_metrics(self, values: dict) -> dict:
        """Metrics a task result carries (the global model's, the cross-site matrix): every rule but
        the stream-only ones (a rate budget must not cost the server its model selection)."""
        with self._lock:
            return self._metrics(values, results=True)

    def _metrics(self, values: dict, results: bool = False) -> dict:
        for rule in self.rules:
            if results and rule.streams_only:
                continue
            out = rule.metrics(values)
            for name in values.keys() - out.keys():
                self.held[rule.column]["system" if name.startswith(SYSTEM_PREFIX) else "metric"] += 1
            values = out
        return values

    def records(self, records: list) -> list:
        """[[step, round, {name: value}], ...]: each record's values gated; emptied records dropped."""
        with self._lock:
            out = [[step, fl_round, self._metrics(values)] for step, fl_round, values in records]
        return [record for record in out if record[2]]

    def texts(self, item: str, values: dict) -> dict:
        with self._lock:
            for rule in self.rules:
                out = rule.texts(item, values)
                self.held[rule.column][item] += len(values.keys() - out.keys())
                values = out
        return values

    def datasets(self, values: dict) -> dict:
        """{context: JSON text} (the DATASETS record): each description as it may leave, if at all;
        one cut or kept back counts one "dataset"."""
        out = {}
        with self._lock:
            for context, text in values.items():
                info = json.loads(text)
                for rule in self.rules:
                    let = rule.dataset(context, dict(info)) if info is not None else None
                    if let != info:
                        self.held[rule.column]["dataset"] += 1
                    info = let
                if info is not None:
                    out[context] = json.dumps(info, sort_keys=True)
        return out

    def text(self, artifact_path: str) -> bool:
        with self._lock:
            for rule in self.rules:
                if not rule.text(artifact_path):
                    self.held[rule.column]["text"] += 1
                    return False
        return True

    def writer(self, writer):
        """An mlflow-like writer (FLARE's MLflowWriter) whose calls pass this gate first."""
        return GatedWriter(writer, self)


class GatedWriter:
    """An mlflow-like writer whose calls are gated; what the gate lets out goes on to the writer
    (the sent counter's, which counts it). A call left with nothing goes nowhere."""

    def __init__(self, writer, gate: OutboundGate):
        self._writer, self._gate = writer, gate

    def __getattr__(self, name):  # anything that is not a record (get_writer_name, ...)
        return getattr(self._writer, name)

    # Metric names are gated as MLflow will store them (the names FlareLogger's records carry).
    def log_metric(self, key, value, step=None):
        out = self._gate.metrics({clean_key(key): value})
        if out:
            ((name, value),) = out.items()
            self._writer.log_metric(key=name, value=value, step=step)

    def log_metrics(self, metrics, step=None):
        out = self._gate.metrics({clean_key(k): v for k, v in metrics.items()})
        if out:
            self._writer.log_metrics(out, step=step)

    def log_param(self, key, value):
        if self._gate.texts("param", {key: value}):
            self._writer.log_param(key, value)

    def log_params(self, values):
        out = self._gate.texts("param", dict(values))
        if out:
            self._writer.log_params(out)

    def set_tag(self, key, tag):
        if self._gate.texts("tag", {key: tag}):
            self._writer.set_tag(key, tag)

    def set_tags(self, tags):
        out = self._gate.texts("tag", dict(tags))
        if out:
            self._writer.set_tags(out)

    def log_text(self, text, artifact_file_path):
        if self._gate.text(artifact_file_path):
            self._writer.log_text(text, artifact_file_path)
