"""The write queue's thread: take a request, send it, settle it; back off when MLflow is away.

A transient failure (server.write_errors) leaves the request where it was and the writer waits,
doubling the wait up to retry_max; new items do not cut the wait short (only close() does, once).
An exception nobody can classify is retried a few times, then isolated like a refusal, so one
bug in an action cannot hold every later item until job end. No exception ends the thread.
"""

import threading
import time

from mlflow.tracking import MlflowClient

from fl_lightning_mlflow.server.tracking_uri import redact_uri
from fl_lightning_mlflow.server.write_errors import refusal


class WriterLoop:
    def __init__(self, queue, retry_initial: float, retry_max: float):
        self.queue = queue
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.last_error = None
        self.abandon = False  # close() gave up waiting: stop at the next turn
        self._unknown_failures = 0  # consecutive unknown failures at the head (kept if the loop restarts)

    def start(self, writers: int = 1) -> list:
        """writers threads, each taking the next request of a lane no other has a request out for."""
        threads = [
            threading.Thread(target=self._main, name=f"mlflow-writer-{i}", daemon=True) for i in range(max(1, writers))
        ]
        for thread in threads:
            thread.start()
        return threads

    def _main(self) -> None:
        """The thread's body: whatever goes wrong in the loop, the loop starts again."""
        queue = self.queue
        while True:
            try:
                self._run()
                return
            except BaseException as e:  # noqa: BLE001 - the writer must outlive any bug of ours
                queue.stats["writer_errors"] += 1
                self.last_error = e
                try:
                    queue.log.exception(f"MLflow writer: unexpected {type(e).__name__}; continuing")
                    with queue._cond:
                        queue._cond.wait(self.retry_initial)
                except BaseException:  # noqa: BLE001, S110 - logging itself failed; keep going
                    time.sleep(self.retry_initial)
                if self.abandon:
                    return

    def _run(self) -> None:
        queue, sender, delay = self.queue, self.queue.sender, self.retry_initial
        while not self.abandon:
            taken = queue._take()
            if taken is None:
                return
            if not taken or not taken[1]:
                continue
            lane, batch = taken
            error, outcome = None, {}
            # The last allowed attempt: an error nobody can classify is then isolated like a refusal.
            isolate = self._unknown_failures >= sender.unknown_error_attempts - 1
            try:
                if sender.client is None:  # made here: opening a database store does I/O
                    sender.client = MlflowClient(queue.tracking_uri)
                sender.send(batch, outcome, isolate_unknown=isolate)
            except Exception as e:  # noqa: BLE001 - a transient failure (or an unknown one, retried)
                error = e
            finally:
                if outcome:  # progress: the head moved on
                    self._unknown_failures = 0
                queue._settle(lane, outcome)  # what was written or refused before a failure is done with
            if error is None:
                if delay != self.retry_initial:
                    queue.log.info("MLflow writes succeed again")
                    self.last_error = None
                delay = self.retry_initial
                continue
            queue.stats["failures"] += 1
            if refusal(error) == "?":
                self._unknown_failures += 1
            if str(error) != str(self.last_error):
                message = redact_uri(str(error))  # a URI's user:password@ stays out of logs
                queue.log.warning(f"MLflow write failed, will retry (items kept): {type(error).__name__}: {message}")
            self.last_error = error
            with queue._cond:
                # Back off for real: new items notify this condition (the writer waiting for work
                # wants them), so only close() or giving up may cut the wait short, once.
                closing = queue._closing
                queue._cond.wait_for(lambda closing=closing: queue._closing != closing or self.abandon, delay)
            delay = min(delay * 2, self.retry_max)
