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

Three repeats, each with a fresh tracker and store; the tables show the median one. The figures:
the fill's rate per 100,000 points against the backlog it began at (flat: a point
costs the same whatever the queue holds), and backlog / empty (the empty phase's writer is
mostly idle: the difference is the writer thread's share of the interpreter, not the backlog).
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


def backlog_of(tracker) -> int:
    lanes = tracker.sink.queue.lanes
    return lanes.in_memory + lanes.spilled


def phase(tracker, fl_ctx, batch: list, chunk: int = 100) -> dict:
    """save() timed around each call; also per `chunk` events, with the backlog each began at."""
    backlog, seconds, chunks, part, part_backlog = backlog_of(tracker), 0.0, [], 0.0, backlog_of(tracker)
    for i, (site, shareable) in enumerate(batch, start=1):
        t = time.perf_counter()
        tracker.save(fl_ctx, shareable, site)
        spent = time.perf_counter() - t
        seconds, part = seconds + spent, part + spent
        if i % chunk == 0:
            chunks.append({"backlog_at_start": part_backlog, "points_per_s": chunk * PER_EVENT / part})
            part, part_backlog = 0.0, backlog_of(tracker)
    points = len(batch) * PER_EVENT
    return {"points": points, "backlog_at_start": backlog, "seconds": seconds, "points_per_s": points / seconds,
            "chunks": chunks}  # fmt: skip


def once(folder, fill: int) -> dict:
    """One fresh tracker and store, the three phases."""
    from mlflow.tracking import MlflowClient
    from nvflare.apis.event_type import EventType

    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    tracker = make_receiver("ours", uri)
    tracker.stream.spec = {}  # no budget: the intake itself is measured
    fl_ctx = context(folder, ["site-1", "site-2"])
    tracker.handle_event(EventType.START_RUN, fl_ctx)
    out = {"empty": phase(tracker, fl_ctx, events("site-1", 100_000, 0))}
    tracker.sink.queue.drain(60)
    out["fill"] = phase(tracker, fl_ctx, events("site-2", fill, 0))
    out["backlog"] = phase(tracker, fl_ctx, events("site-1", 100_000, 100_000 // RECORDS))
    out["backlog_over_empty"] = out["backlog"]["points_per_s"] / out["empty"]["points_per_s"]
    tracker.sink.queue.close(1)
    return out


def run(work, quick: bool, results: dict, save) -> dict:
    fill, repeats = (200_000, 1) if quick else (1_000_000, 3)
    results["repeats"] = []
    for i in range(repeats):
        say(f"ingest: repeat {i + 1} of {repeats} (fill {fill:,} points)")
        results["repeats"].append(once(work / f"ingest-{i}", fill))
        save()
    median = sorted(results["repeats"], key=lambda r: r["backlog_over_empty"])[len(results["repeats"]) // 2]
    results.update({k: median[k] for k in ("empty", "fill", "backlog", "backlog_over_empty")})
    results["ratios"] = [r["backlog_over_empty"] for r in results["repeats"]]
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
        ratios = ", ".join(f"{r:.2f}" for r in results.get("ratios", []))
        rows.append(f"\nbacklog / empty: {results['backlog_over_empty']:.2f} (the median repeat; all: {ratios})")
    chunks = results.get("fill", {}).get("chunks") or []
    if chunks:
        rows += ["", "| fill, per 100,000 points: backlog at start | points/s |", "|---:|---:|"]
        rows += [f"| {c['backlog_at_start']:,} | {c['points_per_s']:,.0f} |" for c in chunks]
    return "\n".join(rows)
