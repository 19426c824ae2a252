"""What the FL server takes in, points per second, with an empty write queue and under a backlog.

FLARE hands the tracker one site event at a time on its event thread (FedEventRunner): every
event behind a slow one waits. Here the tracker is started as FLARE starts it (write_path's
server context, a SQLite store) and fed events of 1,000 points (10 records of 100 values, a
FlareLogger batch) through `save()`, timed around each call, in three phases:

  empty      100,000 points into a queue the writer keeps empty;
  fill       1,000,000 points as fast as save() takes them: the writer (about 10,000 points/s
             into SQLite) falls behind and the queue spills to its journal;
  backlog    100,000 points more, while the queue holds the rest of the fill and the writer is
             reading the spilled items back.

The ratio backlog / empty is the figure: 1.0 means intake does not slow down under a backlog.
No budget is set (site_budget {}): the point is the intake itself. The writer is then closed
without waiting for it to drain (the backlog is not the point either).
"""

import time

from bench_common import say
from write_path import context, make_receiver

PER_EVENT, RECORDS = 1000, 10


def events(site: str, points: int, first_step: int) -> list:
    from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
    from nvflare.apis.utils.analytix_utils import create_analytic_dxo

    out, per_record = [], PER_EVENT // RECORDS
    for e in range(points // PER_EVENT):
        records = []
        for r in range(RECORDS):
            step = first_step + e * RECORDS + r
            records.append([step, 0, {f"layer{i}/mean": 0.5 + step * 1e-6 for i in range(per_record)}])
        dxo = create_analytic_dxo(tag="metrics_batch", value=records[-1][2], data_type=AnalyticsDataType.METRICS,
                                  writer=LogWriterName.MLFLOW, global_step=records[-1][0], records=records)  # fmt: skip
        out.append((site, dxo.to_shareable()))
    return out


def phase(tracker, fl_ctx, batch: list) -> dict:
    queue = tracker.sink.queue
    backlog = queue.lanes.in_memory + queue.lanes.spilled
    seconds = 0.0
    for site, shareable in batch:
        t = time.perf_counter()
        tracker.save(fl_ctx, shareable, site)
        seconds += time.perf_counter() - t
    points = len(batch) * PER_EVENT
    return {"points": points, "backlog_at_start": backlog, "seconds": seconds, "points_per_s": points / seconds}


def run(work, quick: bool, results: dict, save) -> dict:
    from mlflow.tracking import MlflowClient
    from nvflare.apis.event_type import EventType

    fill = 200_000 if quick else 1_000_000
    folder = work / "ingest"
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    tracker = make_receiver("ours", uri)
    tracker.stream.spec = {}  # no budget: the intake itself is measured
    fl_ctx = context(folder, ["site-1", "site-2"])
    tracker.handle_event(EventType.START_RUN, fl_ctx)
    say("ingest: empty queue")
    results["empty"] = phase(tracker, fl_ctx, events("site-1", 100_000, 0))
    tracker.sink.queue.drain(60)
    say(f"ingest: filling {fill} points")
    results["fill"] = phase(tracker, fl_ctx, events("site-2", fill, 0))
    say("ingest: under the backlog")
    results["backlog"] = phase(tracker, fl_ctx, events("site-1", 100_000, 100_000 // RECORDS))
    results["backlog_over_empty"] = results["backlog"]["points_per_s"] / results["empty"]["points_per_s"]
    tracker.sink.queue.close(1)
    save()
    for name in ("empty", "fill", "backlog"):
        r = results[name]
        say(f"  {name}: {r['points_per_s']:,.0f} points/s (backlog at start {r['backlog_at_start']:,})")
    return results


def table(results) -> str:
    rows = ["| phase | points | backlog at start | points/s taken in |", "|---|---:|---:|---:|"]
    for name in ("empty", "fill", "backlog"):
        r = results.get(name)
        if r:
            rows.append(f"| {name} | {r['points']:,} | {r['backlog_at_start']:,} | {r['points_per_s']:,.0f} |")
    if "backlog_over_empty" in results:
        rows.append(f"\nbacklog / empty: {results['backlog_over_empty']:.2f}")
    return "\n".join(rows)
