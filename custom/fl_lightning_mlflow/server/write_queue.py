"""The server's MLflow write path: a queue and one writer thread that never loses a point quietly.

Callers (FLARE's event thread) only append to a queue; the writer thread turns the queue into
MLflow requests within MLflow's limits (log_batch: 1000 metrics, 100 params, 100 tags).

Every failure is classified:
  - transient (connection errors, timeouts, HTTP 429/5xx, 401/403, a run not created yet): the
    request stays at the head of the queue and is retried with exponential backoff until it
    succeeds or `close()` gives up;
  - refused for good (MLflow's INVALID_PARAMETER_VALUE, e.g. a changed param value or a
    deleted run; RESOURCE_DOES_NOT_EXIST; BAD_REQUEST; limits): the batch is split in halves
    until the refused item(s) are isolated, everything else is written, and each refused item
    goes to a dead-letter file (JSON lines, with MLflow's reason), so later items and other
    runs keep flowing.
Every item accepted is first appended to the journal (journal.py: durable within
`sync_seconds`, with a cursor of what is settled), which is also the overflow: past
`max_memory_items` queued items, new items live only in the journal and are read back in
order; a line that cannot be read back is quarantined and counted. No exception ends the
writer thread, and `close()` never raises. Nothing here knows about FLARE, so the write path
can be tested and benchmarked on its own.
"""

import collections
import itertools
import json
import logging
import threading
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fl_lightning_mlflow.common.protocol import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    MAX_TAGS_PER_BATCH,
    SYSTEM_PREFIX,
)
from fl_lightning_mlflow.server.journal import Journal, read_cursor
from fl_lightning_mlflow.server.tracking_uri import redact_uri
from fl_lightning_mlflow.server.write_errors import Refused, RunNotReady, refusal

SCAN = 20_000  # how far ahead one request gathers its run's items
LIMITS = {"metric": MAX_METRICS_PER_BATCH, "param": MAX_PARAMS_PER_BATCH, "tag": MAX_TAGS_PER_BATCH}

# Queue items: ("metric", run_key, key, value, timestamp_ms, step), ("param", run_key, key, value),
# ("tag", run_key, key, value), ("call", name, args): a named action run by the owner's handler
# (create runs, log a model...), retried like the rest. Plain tuples so they journal as JSON.
# In memory each is kept as (seq, item), seq being its number in the journal.
POINT_KINDS = ("metric", "param", "tag")

DEAD_LETTER_FILE = "mlflow_dead_letter.jsonl"


class WriteQueue:
    def __init__(
        self,
        tracking_uri: str,
        journal_dir,
        actions: dict,
        max_memory_items: int = 200_000,
        retry_initial: float = 0.5,
        retry_max: float = 15.0,
        idle_flush: float = 0.5,
        batch_linger: float = 0.25,
        logger: logging.Logger | None = None,
        dead_letter_file=None,
        unknown_error_attempts: int = 5,
        sync_seconds: float = 1.0,
        resume: bool = False,
        run_ids: dict | None = None,
        experiment_id: str | None = None,
    ):
        """actions: name -> callable(client, *args) for "call" items; may raise to be retried.

        run_ids: run_key -> MLflow run id, filled in by the actions that create runs.
        journal_dir: the journal's folder (see journal.py).
        dead_letter_file: where refused items go (default: mlflow_dead_letter.jsonl beside the
            journal folder).
        unknown_error_attempts: how often a request failing with an exception that is neither
            network trouble nor an MLflow error (e.g. a bug in an action) is tried before it is
            isolated like a refused one, so it cannot hold every later item until job end.
        sync_seconds: how often the journal is fsynced and its cursor recorded.
        batch_linger: how long the writer lets points gather before a request that is not full:
            a writer that sends as soon as anything is queued keeps up with a slow producer by
            sending requests of a few points, each costing MLflow as much as a full one.
        resume: recovery: the journal exists; what lies beyond its cursor is queued again.
        run_ids, experiment_id: what is known before the writer starts (recovery).
        """
        self.client = None  # made in the writer thread: opening a database store does I/O
        self.tracking_uri = tracking_uri
        self.actions = actions
        self.run_ids: dict = dict(run_ids or {})
        self.experiment_id = experiment_id
        self.dead_runs: dict = {}  # run_key -> why MLflow will never take its items (deleted, not created)
        self.dead_letter_file = (
            Path(dead_letter_file) if dead_letter_file else Path(journal_dir).parent / DEAD_LETTER_FILE
        )
        self.max_memory_items = max_memory_items
        self.retry_initial, self.retry_max, self.idle_flush = retry_initial, retry_max, idle_flush
        self.batch_linger = batch_linger
        self._filled_since = 0.0  # when the oldest waiting items began to wait (the linger's start)
        # While a request is out: the first seq it could not include, and when the first item
        # arrived after it was taken (those items start a linger of their own once it settles).
        self._request_seq = None
        self._arrived_during_request = None
        self.unknown_error_attempts = max(1, unknown_error_attempts)
        self.log = logger or logging.getLogger(__name__)
        self._memory = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abandon = False
        self._outcome: dict = {}  # position in the queue -> ("written" | "refused") for the current batch
        self._isolate_unknown = False
        self._unknown_failures = 0  # consecutive unknown failures at the head (kept if the loop restarts)
        # queued/written/refused per kind, failures, retries, spilled, quarantined
        self.stats = collections.Counter()
        self.written_by_run = collections.Counter()  # run_key -> points written
        self._unordered = False  # an item kept in memory out of seq order (the journal failed while spilling)
        self.journal = Journal(journal_dir, self.stats, self.log, sync_seconds)
        self.journal_file, self.quarantine_file = self.journal.path, self.journal.quarantine_path
        self.resumed = self.journal.resume_after(read_cursor(journal_dir)) if resume else 0
        self.journal.cursor_fn = self.cursor
        self.refused_by_run = collections.Counter()  # run_key -> points refused (in the dead letter)
        self.last_error = None
        self._thread = threading.Thread(target=self._main, name="mlflow-writer", daemon=True)
        self._thread.start()

    # ----- producer side: one append to the journal per call -----------------------------------
    def put(self, item: tuple) -> None:
        self.put_many([item])

    def put_many(self, items: list) -> None:
        """Queue items in order, journaled with one write (a site's event brings many points)."""
        if not items:
            return
        with self._cond:
            before = len(self._memory)
            # Once spilling, keep order: everything newer lives in the journal only, too.
            spill = bool(self.journal.count) or before + len(items) > self.max_memory_items
            for item, (seq, error) in zip(items, self.journal.append_many(items, spill), strict=True):
                kept = not spill
                if error is not None:
                    # Disk full or an unserializable item: keep it in memory rather than lose it
                    # (it is not crash-proof, and its order against spilled items is given up).
                    kept = True
                    self.stats["journal_failures"] += 1
                    if self.stats["journal_failures"] == 1:
                        self.log.error(f"MLflow queue: could not journal an item ({error}); kept in memory")
                    self._unordered = self._unordered or bool(self.journal.count)
                if kept:
                    self._memory.append((seq, item))
            for kind, n in collections.Counter(item[0] for item in items).items():
                self.stats[f"queued_{kind}"] += n
            # Wake the writer when it waits for a first item or for a full request, not per item.
            queued = len(self._memory)
            if before == 0 and queued:
                self._filled_since = time.monotonic()
            if self._request_seq is not None and self._arrived_during_request is None:
                self._arrived_during_request = time.monotonic()
            full = queued // MAX_METRICS_PER_BATCH > before // MAX_METRICS_PER_BATCH
            if spill or (before == 0 and queued) or full or any(item[0] == "call" for item in items):
                self._cond.notify_all()

    def pending(self) -> collections.Counter:
        """Queued but not yet written nor refused, by kind (memory and journal); journal lines
        that cannot be read count as "unreadable"."""
        with self._cond:
            return collections.Counter(item[0] for _, item in self._memory) + self.journal.pending()

    def cursor(self) -> int:
        """The highest seq up to which every item is settled (written or refused)."""
        with self._cond:
            lowest = [self.journal.first_pending_seq] if self.journal.count else [self.journal.next_seq]
            if self._memory:
                lowest.append(min(s for s, _ in self._memory) if self._unordered else self._memory[0][0])
            return min(lowest) - 1

    # ----- writer thread: taking items ------------------------------------------------------------
    def _take(self) -> list | None:
        """The next request's worth of items as [(position, item)]: one action, or points for one
        run within the limits; None when closing and empty.

        Sites' records interleave in the queue, so points for the head item's run are gathered
        from up to SCAN items ahead (never past an action, which must keep its place). A param
        whose key is already in the batch with another value is left for the next request: MLflow
        refuses duplicate keys in one batch, and then refuses it alone, with its own reason.
        """
        with self._cond:
            while not self._memory and not self.journal.count:
                if self._closing:
                    return None
                self._cond.wait(self.idle_flush)
            # The linger counts from when the waiting items began to wait, not per request: what is
            # left after a full request (or at job end, other runs' points) goes without a new wait.
            until = self._filled_since + self.batch_linger
            while (
                not self._closing
                and not self.journal.count
                and len(self._memory) < MAX_METRICS_PER_BATCH
                and self._memory[0][1][0] != "call"
                and (left := until - time.monotonic()) > 0
            ):
                self._cond.wait(left)
            if not self._memory:
                self.journal.read_into(self._memory, max(1, self.max_memory_items // 2))
                if not self._memory:
                    return []
            self._request_seq, self._arrived_during_request = self.journal.next_seq, None
            first = self._memory[0][1]
            if first[0] == "call":
                return [(0, first)]
            run_key, counts, params = first[1], collections.Counter(), {}
            taken = []
            for i, (_, item) in enumerate(itertools.islice(self._memory, SCAN)):
                if item[0] == "call":
                    break
                if item[1] != run_key:
                    continue
                if counts[item[0]] >= LIMITS[item[0]]:
                    break  # the request is full for this kind: no need to look further ahead
                if item[0] == "param" and params.setdefault(item[2], item[3]) != item[3]:
                    continue
                counts[item[0]] += 1
                taken.append((i, item))
            return taken

    def _settle(self) -> None:
        """Remove the items of the current batch that were written or refused, and count them."""
        outcome, self._outcome = self._outcome, {}
        if not outcome:
            return
        with self._cond:
            last = max(outcome)
            head = [self._memory.popleft() for _ in range(min(len(self._memory), last + 1))]
            keep = [item for i, item in enumerate(head) if i not in outcome]
            for i, result in outcome.items():
                if i >= len(head):
                    continue
                item = head[i][1]
                self.stats[f"{result}_{item[0]}"] += 1
                if item[0] in POINT_KINDS and not (item[0] == "metric" and str(item[2]).startswith(SYSTEM_PREFIX)):
                    # system/ points are monitoring, outside delivery accounting (records.RecordChecker)
                    (self.written_by_run if result == "written" else self.refused_by_run)[item[1]] += 1
            self._memory.extendleft(reversed(keep))
            # Items that all arrived while the request was out have waited only since then: their
            # linger starts there (items older than the request keep theirs, already run out).
            if self._memory and self._request_seq is not None:
                oldest = min(s for s, _ in self._memory) if self._unordered else self._memory[0][0]
                if oldest >= self._request_seq:
                    self._filled_since = self._arrived_during_request or time.monotonic()
            self._request_seq = self._arrived_during_request = None
            self._cond.notify_all()

    # ----- writer thread: sending -------------------------------------------------------------------
    def _write(self, items: list) -> None:
        if items[0][0] == "call":
            _, name, args = items[0]
            if name not in self.actions:
                raise Refused(f"no action named {name!r}")
            self.actions[name](self.client, *args)
            return
        run_key = items[0][1]
        run_id = self.run_ids.get(run_key)
        if run_id is None:
            raise RunNotReady(f"no MLflow run for {run_key!r} yet")
        metrics = [Metric(i[2], float(i[3]), int(i[4]), int(i[5])) for i in items if i[0] == "metric"]
        # Identical params in one batch are sent once: MLflow refuses a key twice in a batch.
        params = [Param(k, v) for k, v in dict.fromkeys((i[2], i[3]) for i in items if i[0] == "param")]
        tags = [RunTag(i[2], i[3]) for i in items if i[0] == "tag"]
        self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def _send(self, batch: list, checked_run: bool = False) -> None:
        """Write batch [(position, item)], isolating what MLflow refuses by halving the batch;
        outcomes go to self._outcome; a transient error propagates (what was settled stays)."""
        first = batch[0][1]
        if first[0] != "call" and first[1] in self.dead_runs:
            for pos, item in batch:
                self._dead_letter(pos, item, self.dead_runs[first[1]], "RUN_GONE")
            return
        try:
            self._write([item for _, item in batch])
        except Exception as e:  # noqa: BLE001 - classified below; transient ones go up to back off
            reason = refusal(e)
            if reason == "?" and self._isolate_unknown:
                reason = f"gave up after {self.unknown_error_attempts} attempts: {type(e).__name__}: {e}"
            if reason is None or reason == "?":
                raise
            if first[0] != "call" and not checked_run and self._run_gone(first[1]):
                return self._send(batch, checked_run=True)  # now in dead_runs: all dead-lettered
            if len(batch) == 1:
                code = getattr(e, "error_code", None) or type(e).__name__
                self._dead_letter(batch[0][0], batch[0][1], reason, code)
                return
            half = len(batch) // 2
            self._send(batch[:half], checked_run=True)
            self._send(batch[half:], checked_run=True)
            return
        for pos, _ in batch:
            self._outcome[pos] = "written"

    def _run_gone(self, run_key) -> bool:
        """After a refusal: is the run itself deleted or missing? Then none of its items can be
        written, and they are dead-lettered without a request each."""
        run_id = self.run_ids.get(run_key)
        try:
            stage = self.client.get_run(run_id).info.lifecycle_stage
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                return False
            stage = "missing"
        if stage == "active":
            return False
        self.mark_dead(run_key, f"run {run_id} is {stage} in MLflow")
        return True

    def mark_dead(self, run_key, reason: str) -> None:
        """No item of this run can ever be written (its run was deleted, or MLflow refused to
        create it): its items go to the dead letter without being sent."""
        if run_key not in self.dead_runs:
            self.dead_runs[run_key] = reason
            self.log.error(f"MLflow refuses every write to {run_key!r}: {redact_uri(reason)}")

    def _dead_letter(self, pos, item, reason, code) -> None:
        self._outcome[pos] = "refused"
        run_key = item[1] if item[0] in POINT_KINDS else None
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_key": run_key,
            "run_id": self.run_ids.get(run_key) if run_key is not None else None,
            "item": list(item),
            "error_code": str(code),
            "reason": redact_uri(str(reason))[:2000],
        }
        try:
            self.dead_letter_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dead_letter_file, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except (OSError, TypeError, ValueError) as e:
            self.stats["dead_letter_write_failures"] += 1
            self.log.error(f"MLflow queue: could not record a refused item in {self.dead_letter_file}: {e}")
        refused = self.stats["refused_metric"] + self.stats["refused_param"] + self.stats["refused_tag"]
        if refused < 10 or item[0] == "call":  # the first few in the log; all of them in the file
            what = f"{item[0]} {item[2]!r} of {run_key!r}" if run_key is not None else f"action {item[1]!r}"
            self.log.warning(f"MLflow refused {what} for good: {record['reason'][:300]} (in {self.dead_letter_file})")

    # ----- writer thread: the loop ---------------------------------------------------------------
    def _main(self) -> None:
        """The thread's body: whatever goes wrong in the loop, the loop starts again."""
        while True:
            try:
                self._run()
                return
            except BaseException as e:  # noqa: BLE001 - the writer must outlive any bug of ours
                self.stats["writer_errors"] += 1
                self.last_error = e
                try:
                    self.log.exception(f"MLflow writer: unexpected {type(e).__name__}; continuing")
                    self._outcome = {}
                    with self._cond:
                        self._cond.wait(self.retry_initial)
                except BaseException:  # noqa: BLE001, S110 - logging itself failed; keep going
                    time.sleep(self.retry_initial)
                if self._abandon:
                    return

    def _run(self) -> None:
        delay = self.retry_initial
        while not self._abandon:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            error = None
            # The last allowed attempt: an error nobody can classify is then isolated like a refusal.
            self._isolate_unknown = self._unknown_failures >= self.unknown_error_attempts - 1
            try:
                if self.client is None:
                    self.client = MlflowClient(self.tracking_uri)
                self._send(batch)
            except Exception as e:  # noqa: BLE001 - a transient failure (or an unknown one, retried)
                error = e
            finally:
                self._isolate_unknown = False
                if self._outcome:  # progress: the head moved on
                    self._unknown_failures = 0
                self._settle()  # what was written or refused before a failure is done with
            if error is None:
                if delay != self.retry_initial:
                    self.log.info("MLflow writes succeed again")
                    self.last_error = None
                delay = self.retry_initial
                continue
            self.stats["failures"] += 1
            if refusal(error) == "?":
                self._unknown_failures += 1
            if str(error) != str(self.last_error):
                message = redact_uri(str(error))  # a URI's user:password@ stays out of logs
                self.log.warning(f"MLflow write failed, will retry (items kept): {type(error).__name__}: {message}")
            self.last_error = error
            with self._cond:
                # Back off for real: new items notify this condition (the writer waiting for work
                # wants them), so only close() or giving up may cut the wait short, once.
                closing = self._closing
                self._cond.wait_for(lambda closing=closing: self._closing != closing or self._abandon, delay)
            delay = min(delay * 2, self.retry_max)

    # ----- the end -----------------------------------------------------------------------------------
    def close(self, timeout: float) -> collections.Counter:
        """Write what is queued, waiting up to timeout seconds; returns what could not be written
        (refused items are not in it: they are in the dead letter). Never raises."""
        try:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abandon = True
            return self.pending()
        except Exception as e:  # noqa: BLE001 - the caller must still write its account
            self.log.error(f"MLflow queue: close failed ({type(e).__name__}: {e}); counting what is in memory")
            counts = collections.Counter(item[0] for _, item in list(self._memory))
            if self.journal.count:
                counts["unreadable"] += self.journal.count
            return counts
        finally:
            self.journal.close()  # the cursor as it stands: what is left is replayed by recovery

    def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty (True) or timeout passes (False); the writer keeps going."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._memory or self.journal.count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True
