"""The server's MLflow write path: a queue and one writer thread that never loses a point quietly.

Callers (FLARE's event thread) only append: one journal write per call, and the items go to
their run's lane (server.lanes). The writer thread takes one request at a time, from the lanes in
turn, within MLflow's limits (log_batch: 1000 metrics, 100 params, 100 tags), and sends it
(server.request_sender: what MLflow refuses for good is isolated and dead-lettered, server.dead_letter).

Every failure is classified (server.write_errors): transient ones (connection errors,
timeouts, HTTP 429/5xx, 401/403, a run not created yet) keep the request at its lane's head and
the writer backs off exponentially (server.writer_loop) until it succeeds or `close()` gives up.
Every item accepted is first appended to the journal (server.journal: durable within
`sync_seconds`, with a cursor of what is settled), which is also the overflow: past
`max_memory_items` queued items, new items live only in the journal and are read back lane by
lane (server.spill). Which run an item goes to is the run registry's (server.run_registry). No
exception ends the writer thread, and `close()` never raises. Nothing here knows about FLARE, so
the write path can be tested and benchmarked on its own.
"""

import collections
import logging
import threading
import time
from pathlib import Path

from fl_lightning_mlflow.common.protocol import MAX_METRICS_PER_BATCH
from fl_lightning_mlflow.server.dead_letter import DEAD_LETTER_FILE, DeadLetter
from fl_lightning_mlflow.server.journal import Journal, read_cursor
from fl_lightning_mlflow.server.lanes import Lanes, take_request
from fl_lightning_mlflow.server.queue_items import Outcome, as_item, counted
from fl_lightning_mlflow.server.request_sender import RequestSender
from fl_lightning_mlflow.server.run_registry import RunRegistry
from fl_lightning_mlflow.server.spill import SpillReader
from fl_lightning_mlflow.server.writer_loop import WriterLoop

__all__ = ["WriteQueue", "DEAD_LETTER_FILE"]


class WriteQueue:
    def __init__(self, tracking_uri: str, journal_dir, actions: dict, max_memory_items: int = 200_000,
                 retry_initial: float = 0.5, retry_max: float = 15.0, idle_flush: float = 0.5,
                 batch_linger: float = 0.25, logger: logging.Logger | None = None, dead_letter_file=None,
                 unknown_error_attempts: int = 5, sync_seconds: float = 1.0, resume: bool = False,
                 run_ids: dict | None = None, experiment_id: str | None = None,
                 call_lanes: dict | None = None, priority_run=None, writers: int | None = None):  # fmt: skip
        """actions: name -> callable(client, *args) for "call" items; may raise to be retried.
        call_lanes: action name -> its run (server.lanes); priority_run: the run served first.
        writers: requests out at once, each for another run (None: 4 to a tracking server, 1 to a database).
        journal_dir: the journal's folder; dead_letter_file: where refused items go (default:
            mlflow_dead_letter.jsonl beside it); sync_seconds: how often it is fsynced.
        unknown_error_attempts: how often a request failing with an error that is neither network
            trouble nor MLflow's (a bug in an action) is tried before it is isolated as refused.
        batch_linger: how long points may gather before a request that is not full (a writer
            that sends as soon as anything is queued sends requests of a few points, each costing
            MLflow as much as a full one).
        resume, run_ids, experiment_id: recovery: what lies beyond the journal's cursor is queued
            again, into the runs known before the writer starts.
        """
        self.tracking_uri = tracking_uri  # its one holder: the writer's client, the sink's state ask it
        self.actions = actions
        self.log = logger or logging.getLogger(__name__)
        self.runs = RunRegistry(run_ids, experiment_id, self.log)
        self.max_memory_items = max_memory_items
        self.batch_linger, self.idle_flush = batch_linger, idle_flush
        self._filled_since = 0.0  # when the oldest waiting items began to wait (the linger's start)
        # While a request is out: the first seq it could not include, and when the first item
        # arrived after it was taken (those items start a linger of their own once it settles).
        self._request_seq = self._arrived_during_request = None
        self._cond, self._closing = threading.Condition(), False
        self.stats = collections.Counter()  # queued/written/refused per kind, failures, retries, spilled...
        self.written_by_run = collections.Counter()  # run_key -> points written
        self.refused_by_run = collections.Counter()  # run_key -> points refused (in the dead letter)
        self.lanes = Lanes(call_lanes, priority_run)
        self.journal = Journal(journal_dir, self.stats, self.log, sync_seconds)
        self.journal_file, self.quarantine_file = self.journal.path, self.journal.quarantine_path
        self.spill = SpillReader(self.journal, self.lanes.call_lanes)
        self.resumed = self.spill.scan_beyond(read_cursor(journal_dir), self.lanes) if resume else 0
        self.journal.cursor_fn = self.cursor
        path = Path(dead_letter_file) if dead_letter_file else Path(journal_dir).parent / DEAD_LETTER_FILE
        self.dead_letter = DeadLetter(path, self.stats, self.log)
        self.dead_letter_file = self.dead_letter.path
        self.sender = RequestSender(self._write, self.runs, self.dead_letter, unknown_error_attempts)
        self.writer = WriterLoop(self, retry_initial, retry_max)
        self._threads = self.writer.start(writers or (4 if str(tracking_uri).startswith("http") else 1))
        self._thread = self._threads[0]

    # The registry owns these; the names stay for the queue's callers and tests.
    run_ids = property(lambda self: self.runs.ids)
    dead_runs = property(lambda self: self.runs.dead)
    client = property(lambda self: self.sender.client)
    last_error = property(lambda self: self.writer.last_error)

    # ----- producer side: one append to the journal per call -----------------------------------
    def put(self, item) -> None:
        self.put_many([item])

    def put_many(self, items: list) -> None:
        """Queue items in order, journaled with one write (a site's event brings many points)."""
        items = [as_item(item) or item for item in items]
        if not items:
            return
        with self._cond:
            lanes, before = self.lanes, self.lanes.in_memory
            # Once spilling, keep order: everything newer lives in the journal only, too.
            spill = bool(lanes.spilled) or before + len(items) > self.max_memory_items
            for item, (seq, error, pos) in zip(items, self.journal.append_many(items), strict=True):
                if error is not None:
                    # Disk full or an unserializable item: keep it in memory rather than lose it
                    # (it is not crash-proof, and its order against spilled items is given up).
                    self.stats["journal_failures"] += 1
                    if self.stats["journal_failures"] == 1:
                        self.log.error(f"MLflow queue: could not journal an item ({error}); kept in memory")
                    lanes.unordered = lanes.unordered or bool(lanes.spilled)
                    pos = None
                elif spill:
                    self.stats["spilled"] += 1
                lanes.add(seq, item, pos if spill else None)
            for kind, n in collections.Counter(item[0] for item in items).items():
                self.stats[f"queued_{kind}"] += n
            # Wake the writer when it waits for a first item or for a full request, not per item.
            queued = lanes.in_memory
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
            counts = self.lanes.kinds_in_memory()
            spilled = [(lane.key, lane.read_pos, lane.spilled) for lane in self.lanes.all() if lane.spilled]
            end = self.journal.size()
        for key, start, n in spilled:
            counts += self.spill.kinds(key, start, n, end)
        if self.stats["spill_missing"]:  # spilled, then the journal could not be read back: lost
            counts["unreadable"] += self.stats["spill_missing"]
        return counts

    def cursor(self) -> int:
        """The highest seq up to which every item is settled (written or refused)."""
        with self._cond:
            floor = self.lanes.floor()
            return (self.journal.next_seq if floor is None else floor) - 1

    # ----- writer thread: taking items and settling them -------------------------------------------
    def _take(self) -> list | None:
        """The next request's worth of items as (lane, [(position, item)]): one action, or points
        for one run within the limits; None when closing and empty."""
        with self._cond:
            while not self.lanes.pending():
                if self._closing:
                    return None
                self._cond.wait(self.idle_flush)
            # The linger counts from when the waiting items began to wait, not per request: what is
            # left after a full request (or at job end, other runs' points) goes without a new wait.
            until = self._filled_since + self.batch_linger
            while not self._closing and self.lanes.may_linger() and (left := until - time.monotonic()) > 0:
                self._cond.wait(left)
            lane, barrier = self.lanes.next()
            if lane is None:  # every lane with work has a request out (other writers): wait for one
                self._cond.wait(self.idle_flush)
                return []
            self.lanes.busy.add(lane)  # one request per lane at a time: a run's order is kept
            spilled = lane.spilled and not lane.memory  # read back once what memory held went out
            want = max(1, min(self.max_memory_items // 2, 5 * MAX_METRICS_PER_BATCH))  # the memory bound holds
            reading = (lane.key, lane.read_pos, lane.spilled, want, self.journal.size()) if spilled else None
        if reading:  # off the queue's lock: the event thread keeps appending meanwhile
            entries, consumed, pos = self.spill.read(*reading)
            with self._cond:
                self.lanes.read_back(lane, entries, consumed, pos)
        with self._cond:
            batch = take_request(lane, barrier) if lane.memory else []
            if not batch:
                self.lanes.busy.discard(lane)
                return []
            self._request_seq, self._arrived_during_request = self.journal.next_seq, None
            return lane, batch

    def _settle(self, lane, outcome: dict) -> None:
        """Remove the items of the current request that were written or refused, and count them."""
        with self._cond:
            self.lanes.busy.discard(lane)
            self.lanes.served(lane)  # its turn is over (lanes made meanwhile go after it)
            if not outcome:
                return
            settled = self.lanes.remove(lane, outcome)
            for pos, (_, item) in zip(sorted(outcome), settled, strict=False):
                self.stats[f"{outcome[pos].value}_{item.kind}"] += 1
                if counted(item):
                    (self.written_by_run if outcome[pos] is Outcome.WRITTEN else self.refused_by_run)[item.run_key] += 1
            # Items that all arrived while the request was out have waited only since then: their
            # linger starts there (items older than the request keep theirs, already run out).
            floor = self.lanes.floor()
            if floor is not None and self._request_seq is not None and floor >= self._request_seq:
                self._filled_since = self._arrived_during_request or time.monotonic()
            self._request_seq = self._arrived_during_request = None
            self._cond.notify_all()

    def _write(self, items: list) -> None:
        """Send one request (server.request_sender.write_items); here so it can be instrumented."""
        self.sender.write_items(items, self.actions)

    # ----- the end -----------------------------------------------------------------------------------
    def close(self, timeout: float) -> collections.Counter:
        """Write what is queued, waiting up to timeout seconds; returns what could not be written
        (refused items are not in it: they are in the dead letter). Never raises."""
        try:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            deadline = time.monotonic() + timeout
            for thread in self._threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if any(thread.is_alive() for thread in self._threads):
                self.writer.abandon = True
            return self.pending()
        except Exception as e:  # noqa: BLE001 - the caller must still write its account
            self.log.error(f"MLflow queue: close failed ({type(e).__name__}: {e}); counting what is in memory")
            counts = self.lanes.kinds_in_memory()
            counts["unreadable"] += self.lanes.spilled
            return counts
        finally:
            self.journal.close()  # the cursor as it stands: what is left is replayed by recovery

    def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty (True) or timeout passes (False); the writer keeps going."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.lanes.pending():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True
