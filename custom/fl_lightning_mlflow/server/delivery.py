"""Delivery, counted end to end: what each site says it sent against what reached MLflow.

Sites report their cumulative sent counts in task results (common.protocol.SENT_COUNTS_META),
the reliable channel; their metrics travel as best-effort analytics events, which can be lost
without a trace. At the end of the job the ledger lines the last report of each site up with
what the server received (records.RecordChecker), rejected, and what MLflow wrote or refused for
good (the write queue's per-run counters; a site's run key is its name), per site:

  sent      what the site handed to FLARE up to its last task result (points, params, tags)
  received  what reached the server and passed its checks
  rejected  what reached the server and failed them (never written)
  written   what MLflow confirmed written to the site's run
  refused   what MLflow refused for good
  lost      sent - written - refused - rejected - throttled here, never below 0
  in_flight sent - received - rejected - throttled here: never reached the server (events lost on the way, or
            still in flight when the server stopped listening)
  throttled what went over the site's budget (common.stream_budget): held back by the site itself
            (its HELD_COUNTS_META column "throttled", never sent) plus what the server dropped on
            arrival (sent, so subtracted above); a number for every site
  withheld  what the site's own disclosure policy kept on the site (common.protocol.HELD_COUNTS_META,
            one column per outbound rule in HELD_COLUMNS): never sent, so outside the balance above;
            None for a site that reported no such counts

Points a site sends after its last task result (e.g. logs during cross-site validation) are in
no report: they make written exceed sent, and only the site's END_RUN log line counts them.
Pure Python: no FLARE, no MLflow.
"""

from collections.abc import Mapping

from fl_lightning_mlflow.common.protocol import DELIVERY_METRIC_PREFIX, HELD_COLUMNS, HELD_KINDS, SENT_KINDS, check_key

COLUMNS = ("sent", "received", "rejected", "written", "refused", "lost", "in_flight", *HELD_COLUMNS)
THROTTLED = "throttled"  # a HELD_COLUMNS column; the server's own drops are added to it


def _count(value) -> int | None:
    """A count as given: an int, or {kind: int} (summed); None if it is neither."""
    if isinstance(value, Mapping):
        parts = [_count(v) for v in value.values()]
        return None if any(p is None for p in parts) else sum(parts)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


class DeliveryLedger:
    def __init__(self):
        self.sent: dict = {}  # site -> {kind: count}, the largest count each kind reached
        self.held: dict = {}  # site -> {column: {kind: count}}: what its outbound rules held back

    def report(self, site, counts) -> bool:
        """A site's cumulative counts from one task result; False (ignored) if malformed.
        Results may arrive out of order, so each kind keeps the largest count reported."""
        if not isinstance(site, str) or not site or not isinstance(counts, Mapping):
            return False
        clean = {k: counts[k] for k in SENT_KINDS if k in counts}
        if not clean or any(_count(v) is None or isinstance(v, Mapping) for v in clean.values()):
            return False
        known = self.sent.setdefault(site, dict.fromkeys(SENT_KINDS, 0))
        for kind, n in clean.items():
            known[kind] = max(known[kind], n)
        return True

    def report_held(self, site, held) -> bool:
        """A site's cumulative held counts {column: {kind: count}} from one task result; False
        (ignored) if malformed. Columns other than HELD_COLUMNS are ignored; largest count wins."""
        if not isinstance(site, str) or not site or not isinstance(held, Mapping):
            return False
        clean = {c: held[c] for c in HELD_COLUMNS if isinstance(held.get(c), Mapping)}
        if not clean or any(_count(n) is None or isinstance(n, Mapping) for c in clean.values() for n in c.values()):
            return False
        known = self.held.setdefault(site, {})
        for column, counts in clean.items():
            kinds = known.setdefault(column, dict.fromkeys(HELD_KINDS, 0))
            for kind, n in counts.items():
                if kind in HELD_KINDS:
                    kinds[kind] = max(kinds[kind], n)
        return True

    def throttled_by(self, site) -> int:
        """Points the site's own budget held back (as it last reported)."""
        return sum(self.held.get(site, {}).get(THROTTLED, {}).values())

    def table(
        self,
        received: Mapping,
        written: Mapping | None,
        refused: Mapping | None = None,
        rejected: Mapping | None = None,
        throttled: Mapping | None = None,
    ) -> dict:
        """{site: row} over every site that reported or was received from.

        received: site -> {kind: count} (RecordChecker.received); written, refused: site -> count
        or {kind: count} (the write queue's per-run counters), None where the queue does not keep
        them (then written, lost are None: unknown, not zero); rejected: site -> count."""
        refused, rejected, throttled = refused or {}, rejected or {}, throttled or {}
        out = {}
        for site in sorted(set(self.sent) | set(received)):
            sent = sum(self.sent[site].values()) if site in self.sent else None
            got = _count(received.get(site, {})) or 0
            bad = _count(rejected.get(site, 0)) or 0
            done = None if written is None else (_count(written.get(site, 0)) or 0)
            no = _count(refused.get(site, 0)) or 0
            dropped = _count(throttled.get(site, 0)) or 0  # over budget on arrival (server.site_stream)
            row = {
                "sent": sent,
                "throttled": dropped,
                "received": got,
                "rejected": bad,
                "written": done,
                "refused": no,
                "lost": None if sent is None or done is None else max(0, sent - done - no - bad - dropped),
                "in_flight": None if sent is None else max(0, sent - got - bad - dropped),
            }
            for column in HELD_COLUMNS:
                held = self.held.get(site, {}).get(column)
                row[column] = None if held is None else sum(held.values())
                if held is not None:
                    row[f"{column}_by_kind"] = dict(held)
            row[THROTTLED] = (row.get(THROTTLED) or 0) + dropped
            if site in self.sent:
                row["sent_by_kind"] = dict(self.sent[site])
            row["received_by_kind"] = dict(received.get(site, {}))
            out[site] = row
        return out

    @staticmethod
    def complete(table: dict) -> bool:
        """Nothing any site reported sending is missing (unknowns are not counted as losses)."""
        return not any(row["lost"] for row in table.values())

    @staticmethod
    def message(table: dict) -> str:
        """The one log line: short when all arrived, every number where something is missing."""
        if not table:
            return "delivery: no site reported what it sent"
        parts = []
        for site, row in table.items():
            sent = "?" if row["sent"] is None else row["sent"]
            written = "? (not counted per run by the write queue)" if row["written"] is None else row["written"]
            if not row["lost"]:
                part = f"{site} sent {sent}, written {written}"
                part += held_text(row)
                if row["sent"] is None:
                    part += " (no task result reported its counts)"
                elif row["written"] is not None and row["written"] > row["sent"]:
                    part += " (the rest was sent after its last task result: see its END_RUN log)"
            else:
                part = (
                    f"{site} sent {sent}, received {row['received']}, rejected {row['rejected']}, "
                    f"written {written}, refused {row['refused']}, lost {row['lost']}"
                )
                part += held_text(row)
                if row["in_flight"]:
                    part += f" ({row['in_flight']} never reached the server: events lost on the way or still in flight)"
            parts.append(part)
        return "delivery: " + "; ".join(parts)

    @staticmethod
    def metrics(table: dict) -> list:
        """[(name, value)] for the parent run, at step 0: delivery/<site>/<column>, known numbers only."""
        points = []
        for site, row in table.items():
            for column in COLUMNS:
                name = f"{DELIVERY_METRIC_PREFIX}{site}/{column}"
                if row.get(column) is not None and check_key(name) is None:
                    points.append((name, float(row[column])))
            for column in HELD_COLUMNS:  # and by kind, where something was held: delivery/<site>/withheld/<kind>
                for kind, n in (row.get(f"{column}_by_kind") or {}).items():
                    name = f"{DELIVERY_METRIC_PREFIX}{site}/{column}/{kind}"
                    if n and check_key(name) is None:
                        points.append((name, float(n)))
        return points


def held_text(row: dict) -> str:
    """ ", withheld 12" for each held column with a count (what the site's own rules kept back)."""
    return "".join(f", {column} {row[column]}" for column in HELD_COLUMNS if row.get(column))
