"""The job's account at its end: the stats file in the job's run folder, and one line for the log.

What was received, written, refused (with the dead letter's path), lost, quarantined, rejected,
truncated; the journal; the slowest event; the run ids. flctl, the tests and the benchmarks read
the file (common.protocol.STATS_FILE); the lost and refused counts also go on the runs as tags
where MLflow still answers.
"""

import json

from fl_lightning_mlflow.common.protocol import DELIVERY_STATS_KEY, PARENT_RUN_KEY
from fl_lightning_mlflow.server.tracking_uri import redact_uri


def write_report(queue, path, status, failure, lost, records, timings: dict, extra: dict | None = None) -> tuple:
    """Write the stats file at path, with extra's keys beside the queue's own; returns (nothing lost
    nor refused, the one line to log). Never raises: whatever part of the account cannot be made,
    the file is written."""
    log = queue.log
    refused = {key: n for key, n in queue.refused_by_run.items() if n}
    stats = {"status": status, "failure": failure, "lost": dict(lost)}
    try:
        stats.update(
            {
                "received": {site: dict(c) for site, c in records.received.items()},
                "written": {k: v for k, v in queue.stats.items() if k.startswith("written_")},
                "lost": dict(lost),
                "refused": refused,  # run key -> points MLflow refused for good (in the dead letter)
                "refused_actions": queue.stats["refused_call"],
                "dead_letter": str(queue.dead_letter_file) if queue.dead_letter_file.exists() else None,
                "quarantined": queue.stats["quarantined"],  # unreadable journal lines, kept aside
                "rejected": dict(records.rejected),
                # site -> system/ points received: monitoring, outside the delivery table
                "system_metrics": dict(getattr(records, "system_received", {})),
                "truncated": dict(records.truncated),
                "write_failures": queue.stats["failures"],
                "spilled": queue.stats["spilled"],
                "journal": str(queue.journal.folder),
                "journal_failures": queue.stats["journal_failures"],
                "max_event_seconds": round(timings["max_event_seconds"], 6),
                "probe_seconds": round(timings["probe_seconds"], 6),
                "slowest_event": timings["slowest_event"],
                "run_ids": dict(queue.run_ids),
            }
        )
    except Exception as e:  # noqa: BLE001 - a partial account is better than none
        stats["account_error"] = f"{type(e).__name__}: {e}"
        stats.setdefault("run_ids", dict(queue.run_ids))
    stats.update(extra or {})
    try:
        path.write_text(json.dumps(stats, indent=2, default=str))
    except (OSError, TypeError, ValueError) as e:
        log.error(f"MLflow: could not write {path}: {e}")
    if queue.client is not None:
        marks = [(key, "refused_items", str(n)) for key, n in refused.items() if key not in queue.dead_runs]
        for site, row in (stats.get(DELIVERY_STATS_KEY) or {}).items():  # over its budget: said on its run
            if isinstance(row, dict) and row.get("throttled"):
                marks.append((site, "throttled_points", str(row["throttled"])))
        if sum(lost.values()):
            marks.append((PARENT_RUN_KEY, "lost_items", json.dumps(dict(lost))))
        for key, tag, value in marks:  # one quick attempt each to mark it on the run itself
            try:
                if key in queue.run_ids:
                    queue.client.set_tag(queue.run_ids[key], tag, value)
            except Exception:  # noqa: BLE001, S110 - the server is still unreachable; the log and file say it
                pass
    where = f"counts in {path}"
    if refused:
        where += f"; refused items with MLflow's reasons in {queue.dead_letter_file}"
    if not sum(lost.values()):
        if refused:
            return (
                False,
                f"MLflow: refused {sum(refused.values())} item(s) for good {refused}; status {status}; {where}",
            )
        slowest = timings["max_event_seconds"] * 1000
        return (
            True,
            f"MLflow: all written ({stats.get('written')}); status {status}; slowest event handled in {slowest:.1f} ms",
        )
    error = redact_uri(str(queue.last_error))
    return (
        False,
        f"MLflow: could not write {dict(lost)} after retrying until job end (last error: {error}); {where}",
    )
