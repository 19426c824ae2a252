"""The server's MLflow write path: a queue and one writer thread that never loses a point quietly.

Callers (FLARE's event thread) only append to a queue; the writer thread turns the queue into
MLflow requests within MLflow's limits (log_batch: 1000 metrics, 100 params, 100 tags). A
request that fails stays at the head of the queue and is retried with exponential backoff
until it succeeds or `close()` gives up; past `max_memory_items` queued items, new items
spill to a JSON-lines file and come back in order. Nothing here knows about FLARE, so the
write path can be tested and benchmarked on its own.
"""

import collections
import itertools
import json
import logging
import threading
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from fl_lightning_mlflow.common.protocol import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, MAX_TAGS_PER_BATCH
from fl_lightning_mlflow.server.tracking_uri import redact_uri

SCAN = 20_000  # how far ahead one request gathers its run's items
LIMITS = {"metric": MAX_METRICS_PER_BATCH, "param": MAX_PARAMS_PER_BATCH, "tag": MAX_TAGS_PER_BATCH}

# Queue items: ("metric", run_key, key, value, timestamp_ms, step), ("param", run_key, key, value),
# ("tag", run_key, key, value), ("call", name, args): a named action run by the owner's handler
# (create runs, log a model...), retried like the rest. Plain tuples so they spill as JSON.
POINT_KINDS = ("metric", "param", "tag")


class WriteQueue:
    def __init__(
        self,
        tracking_uri: str,
        spill_file,
        actions: dict,
        max_memory_items: int = 200_000,
        retry_initial: float = 0.5,
        retry_max: float = 15.0,
        idle_flush: float = 0.5,
        logger: logging.Logger | None = None,
    ):
        """actions: name -> callable(client, *args) for "call" items; may raise to be retried.

        run_ids: run_key -> MLflow run id, filled in by the actions that create runs.
        """
        self.client = None  # made in the writer thread: opening a database store does I/O
        self.tracking_uri = tracking_uri
        self.actions = actions
        self.run_ids: dict = {}
        self.spill_file = Path(spill_file)
        self.max_memory_items = max_memory_items
        self.retry_initial, self.retry_max, self.idle_flush = retry_initial, retry_max, idle_flush
        self.log = logger or logging.getLogger(__name__)
        self._memory = collections.deque()
        self._spilled = 0  # items in the spill file not yet read back
        self._spill_read_pos = 0
        self._cond = threading.Condition()
        self._closing = False
        self._abandon = False
        self._taken: list = []
        self.stats = collections.Counter()  # queued/written per kind, failures, retries
        self.last_error = None
        self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self._thread.start()

    # ----- producer side: O(1), no I/O unless spilling -------------------------------------
    def put(self, item: tuple) -> None:
        with self._cond:
            if self._spilled or len(self._memory) >= self.max_memory_items:
                self._spill(item)  # once spilling, keep order: everything newer goes to the file too
            else:
                self._memory.append(item)
            self.stats[f"queued_{item[0]}"] += 1
            self._cond.notify()

    def _spill(self, item) -> None:
        self.spill_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spill_file, "a") as f:
            f.write(json.dumps(item) + "\n")
        self._spilled += 1
        self.stats["spilled"] += 1

    def pending(self) -> collections.Counter:
        """Queued but not yet written, by kind (memory and spill file)."""
        with self._cond:
            counts = collections.Counter(item[0] for item in self._memory)
            if self._spilled:
                with open(self.spill_file) as f:
                    f.seek(self._spill_read_pos)
                    for line in f:
                        counts[json.loads(line)[0]] += 1
            return counts

    # ----- writer thread ----------------------------------------------------------------------
    def _refill_from_spill(self) -> None:
        """Called with the lock held when memory is empty: read back the oldest spilled items."""
        with open(self.spill_file) as f:
            f.seek(self._spill_read_pos)
            while len(self._memory) < self.max_memory_items // 2 or not self._memory:
                line = f.readline()
                if not line:
                    break
                self._memory.append(tuple(json.loads(line)))
                self._spilled -= 1
            self._spill_read_pos = f.tell()
        if not self._spilled:
            self.spill_file.unlink(missing_ok=True)
            self._spill_read_pos = 0

    def _take(self) -> list:
        """The next request's worth of items: one action, or points for one run within the limits.

        Sites' records interleave in the queue, so points for the head item's run are gathered
        from up to SCAN items ahead (never past an action, which must keep its place).
        """
        with self._cond:
            while not self._memory and not self._spilled:
                if self._closing:
                    return []
                self._cond.wait(self.idle_flush)
            if not self._memory:
                self._refill_from_spill()
            first = self._memory[0]
            if first[0] == "call":
                self._taken = [0]
                return [first]
            run_key, counts = first[1], collections.Counter()
            taken = []
            for i, item in enumerate(itertools.islice(self._memory, SCAN)):
                if item[0] == "call":
                    break
                if item[1] == run_key and counts[item[0]] < LIMITS[item[0]]:
                    counts[item[0]] += 1
                    taken.append(i)
            self._taken = taken
            return [self._memory[i] for i in taken]

    def _done(self) -> None:
        """Remove the items the last _take returned (positions in the first SCAN items)."""
        with self._cond:
            taken = set(self._taken)
            head = [self._memory.popleft() for _ in range(min(len(self._memory), max(taken) + 1))]
            keep = [item for i, item in enumerate(head) if i not in taken]
            for i in taken:
                self.stats[f"written_{head[i][0]}"] += 1
            self._memory.extendleft(reversed(keep))
            self._cond.notify_all()

    def _write(self, items: list) -> None:
        if items[0][0] == "call":
            _, name, args = items[0]
            self.actions[name](self.client, *args)
            return
        run_key = items[0][1]
        run_id = self.run_ids.get(run_key)
        if run_id is None:
            raise RuntimeError(f"no MLflow run for {run_key!r} yet")
        metrics = [Metric(i[2], float(i[3]), int(i[4]), int(i[5])) for i in items if i[0] == "metric"]
        params = [Param(i[2], i[3]) for i in items if i[0] == "param"]
        tags = [RunTag(i[2], i[3]) for i in items if i[0] == "tag"]
        self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def _run(self) -> None:
        delay = self.retry_initial
        while not self._abandon:
            items = self._take()
            if not items:
                return
            try:
                if self.client is None:
                    self.client = MlflowClient(self.tracking_uri)
                self._write(items)
            except Exception as e:  # any failure: keep the items, back off, retry
                self.stats["failures"] += 1
                if str(e) != str(self.last_error):
                    error = redact_uri(str(e))  # a URI's user:password@ stays out of logs
                    self.log.warning(f"MLflow write failed, will retry (items kept): {type(e).__name__}: {error}")
                self.last_error = e
                with self._cond:
                    self._cond.wait(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            if delay != self.retry_initial:
                self.log.info("MLflow writes succeed again")
                self.last_error = None
            delay = self.retry_initial
            self._done()

    def close(self, timeout: float) -> collections.Counter:
        """Write what is queued, waiting up to timeout seconds; returns what could not be written."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon = True
        return self.pending()

    def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty (True) or timeout passes (False); the writer keeps going."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._memory or self._spilled:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True
