"""The end of a tracked job: the cross-site table, the delivery account, the models, the runs'
ends and the stats file, in that order, within the tracker's final_flush_timeout.

Each step is guarded: whatever fails, the runs still end with a status that says what happened,
and the stats file is written. The delivery account (server.delivery) lines up what each site
reported sending with what was received, throttled (over its budget, on the site or here),
rejected, written and refused.
"""

import time

from nvflare.apis.fl_context import FLContext

from fl_lightning_mlflow.common.protocol import (
    BEST_MODEL_STATS_KEY,
    DELIVERY_STATS_KEY,
    REGISTERED_MODEL_STATS_KEY,
)
from fl_lightning_mlflow.common.protocol import (
    PARENT_RUN_KEY as PARENT,
)


def now() -> int:
    return int(time.time() * 1000)


def delivery_table(tracker) -> dict:
    queue, stream = tracker.sink.queue, tracker.stream
    return tracker.delivery.table(
        tracker.records.received, queue.written_by_run, queue.refused_by_run, tracker.records.rejected_items,
        throttled=stream.throttled,
    )  # fmt: skip


def end_job(tracker, fl_ctx: FLContext) -> None:
    """The tracker's finalize, after it stopped taking events."""
    try:
        status, failure, site_status = tracker.summary.outcome(tracker.sink.sites)
    except Exception as e:  # noqa: BLE001 - the runs must still end, with a status that says it
        status, failure, site_status = "FAILED", f"tracker could not sum up the job: {type(e).__name__}: {e}", {}
    try:
        points, rows = tracker.summary.cross_site()
        tracker.sink.cross_site(points, rows, now())
    except Exception as e:  # noqa: BLE001 - the matrix is optional; the runs' ends and stats file are not
        tracker.logger.warning(f"MLflow: no cross-site table: {type(e).__name__}: {e}")
    # Delivery on the parent run: no site data comes in any more, so once the queue has drained
    # what MLflow wrote per site is final. One flush budget for this wait and finish's together.
    deadline = time.monotonic() + tracker.final_flush_timeout
    try:
        drained = tracker.sink.queue.drain(tracker.final_flush_timeout)
        tracker.sink.metrics(PARENT, tracker.delivery.metrics(delivery_table(tracker)), now(), step=0)
    except Exception as e:  # noqa: BLE001 - the runs' ends and the stats file must still follow
        drained = False
        tracker.logger.warning(f"delivery: could not log the account on the parent run: {type(e).__name__}: {e}")
    left = max(0.0, deadline - time.monotonic())
    if drained:  # MLflow keeps up: the models and run ends still get a fair chance to be written
        left = max(left, min(30.0, tracker.final_flush_timeout))
    rounds_done = None if tracker.sink.last_round is None else tracker.sink.last_round + 1
    models = (tracker.app_dir / "FL_global_model.pt", tracker.app_dir / "best_FL_global_model.pt", tracker.summary.best,
              rounds_done)  # fmt: skip
    lost = tracker.sink.finish(status, failure, site_status, models, left)
    # The final delivery account (after finish: what the last wait still wrote counts) goes
    # into the stats file with the rest, in the one write.
    try:
        table = delivery_table(tracker)
    except Exception as e:  # noqa: BLE001 - an account that cannot be made is said, not raised
        tracker.log_warning(fl_ctx, f"delivery: no account: {type(e).__name__}: {e}")
        table = None
    extra = {DELIVERY_STATS_KEY: table} if table is not None else {}
    # site -> points over its budget that arrived here anyway (never written); system/ ones apart
    extra["throttled"], extra["throttled_system"] = (
        dict(tracker.stream.throttled),
        dict(tracker.stream.throttled_system),
    )
    if tracker.models.aliases:
        extra[REGISTERED_MODEL_STATS_KEY] = tracker.models.registered()
    if tracker.summary.best is not None:  # what flctl prints as the best model
        best_round, best_value = tracker.summary.best
        extra[BEST_MODEL_STATS_KEY] = {"round": best_round, "key_metric": tracker.key_metric_name,
                                       "value": best_value, "mode": tracker.key_metric_mode}  # fmt: skip
    complete, message = tracker.sink.report(status, failure, lost, tracker.records, tracker.timings, extra)
    (tracker.log_info if complete else tracker.log_error)(fl_ctx, message)
    if table is not None:
        delivery = tracker.delivery
        (tracker.log_info if delivery.complete(table) else tracker.log_warning)(fl_ctx, delivery.message(table))
