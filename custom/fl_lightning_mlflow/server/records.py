"""What a site sends, checked and bounded before anything of it is queued for MLflow.

Pure Python over already-decoded data: names MLflow would refuse, values that are not numbers,
steps that are not ints >= 0, events with more items than a site could plausibly send, and
param/tag values longer than MLflow keeps (cut, not dropped). Each distinct problem is logged
once through `warn` and counted every time, so a faulty site cannot flood the server log while
the stats file still says how often it happened.
"""

import collections
from collections.abc import Callable

from fl_lightning_mlflow.common.protocol import (
    MAX_ITEMS_PER_EVENT,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    SYSTEM_PREFIX,
    check_key,
)
from fl_lightning_mlflow.server.dataset_inputs import problem_of

LIMITS = {"param": MAX_PARAM_VALUE_LENGTH, "tag": MAX_TAG_VALUE_LENGTH}


def _has_values(record) -> bool:
    return isinstance(record, (list, tuple)) and len(record) == 3 and isinstance(record[2], dict)


def _is_step(step) -> bool:
    return isinstance(step, int) and not isinstance(step, bool) and step >= 0


class RecordChecker:
    def __init__(self, warn: Callable[[str], None]):
        """warn: called once per distinct problem with one line (e.g. the component's logger)."""
        self.warn = warn
        self.received = collections.defaultdict(collections.Counter)  # site -> kind -> accepted
        # site -> system metric points accepted: monitoring, kept out of delivery accounting (sites
        # do not count them in their task results: samples go on after the last one)
        self.system_received = collections.Counter()
        self.rejected = collections.Counter()  # "site: what" -> times
        # site -> items refused (values of a refused record, not records): what delivery
        # accounting (server.delivery) subtracts from what a site sent before calling it lost
        self.rejected_items = collections.Counter()
        self.truncated = collections.Counter()
        self._auto_step = collections.Counter()  # (site, name) -> next step when none is given

    def metrics(self, site: str, records) -> list:
        """records: [[step, round, {name: value}], ...] (FlareLogger's batch). Returns the
        accepted points [(name, float value, step)]; everything else is counted and logged."""
        points, budget = [], MAX_ITEMS_PER_EVENT
        for i, record in enumerate(records):
            if not _has_values(record):
                self.reject(site, "metric record", None, "is not [step, round, {name: value}]")
                continue
            step, _, values = record
            if step is not None and not _is_step(step):
                self.reject(site, "metric record", None, f"has step {str(step)[:20]!r}, not an int >= 0", len(values))
                continue
            if len(values) > budget:
                rest = sum(len(r[2]) for r in records[i:] if _has_values(r))
                self.reject(site, "metric record", None, f"exceeds {MAX_ITEMS_PER_EVENT} values per event", rest)
                break
            budget -= len(values)
            for key, value in values.items():
                point = self._metric(site, key, value, step)
                if point:
                    points.append(point)
        return points

    def _metric(self, site, key, value, step):
        if self.reject(site, "metric", key):
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.reject(site, "metric", key, f"has a {type(value).__name__} value, not a number")
            return None
        if step is None:  # no step given: count up per name rather than pile every point on 0
            step = self._auto_step[(site, key)]
            self._auto_step[(site, key)] += 1
        if key.startswith(SYSTEM_PREFIX):
            self.system_received[site] += 1
        else:
            self.received[site]["metric"] += 1
        return key, float(value), int(step)

    def texts(self, site: str, item: str, values: dict) -> list:
        """item "param" or "tag"; values {name: value}. Returns [(name, text)] within MLflow's limits."""
        if len(values) > MAX_ITEMS_PER_EVENT:
            self.reject(site, f"{item}s event", None, f"exceeds {MAX_ITEMS_PER_EVENT} values per event", len(values))
            return []
        accepted = []
        for key, value in values.items():
            if self.reject(site, item, key):
                continue
            self.received[site][item] += 1
            accepted.append((key, self._bounded(site, item, key, value)))
        return accepted

    def datasets(self, site: str, values) -> list:
        """A DATASETS record's value {context: JSON text}; returns the [(context, text)] that
        can be dataset inputs; each refused one is counted and its reason logged once."""
        if not isinstance(values, dict):
            self.reject(site, "datasets record", None, "is not {context: JSON text}")
            return []
        accepted = []
        for context, text in list(values.items())[:MAX_ITEMS_PER_EVENT]:
            problem = problem_of(context, text)
            if problem:
                self.reject(site, "dataset", None, problem, items=0)  # not counted as sent: not a point
            else:  # not in `received`: delivery accounting counts points, params and tags only
                accepted.append((context, text))
        return accepted

    def _bounded(self, site, item, key, value) -> str:
        """The value as text, cut to MLflow's limit; the cut is logged once per name and counted."""
        text, limit = str(value), LIMITS[item]
        if len(text) > limit:
            self._count(
                self.truncated,
                f"{site}: {item} {key!r} value of {len(text)} characters cut to {limit} (MLflow's limit)",
            )
            text = text[:limit]
        return text

    def reject(self, site: str, kind: str, key, reason: str | None = None, items: int = 1) -> bool:
        """Refuse what MLflow would refuse (a name, for metric/param/tag) or a malformed record,
        with a reason logged once as "rejected <site>: ..."; True if refused. items: how many
        values the refused thing held (a record's), for the site's delivery account."""
        reason = reason or (check_key(key) if kind in ("metric", "param", "tag") else None)
        if reason:
            named = f" name {str(key)[:60]!r}" if key is not None else ""
            self._count(self.rejected, f"{site}: {kind}{named} {reason}", "rejected ")
            self.rejected_items[site] += items
        return reason is not None

    def unsupported(self, site: str, kind) -> None:
        """A data type MLflow has no place for here: counted, not logged (FLARE may send many)."""
        self.rejected[f"{site}: unsupported {kind}"] += 1

    def _count(self, counter: collections.Counter, what: str, prefix: str = "") -> None:
        counter[what] += 1
        if counter[what] == 1:
            self.warn(prefix + what)
