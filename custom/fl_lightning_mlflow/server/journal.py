"""The write queue's journal: every item the FL server accepts, in order, on disk, with a cursor.

Files in the job's journal folder (JOURNAL_DIR in the server's job workspace):
  items.jsonl   one JSON line [seq, kind, ...] per accepted item, appended as it is accepted
                (one write(2) per accepted batch, done before it is accepted: a killed FL server process
                loses none of them) and fsynced
                every `sync_seconds` by a thread of its own (a crash of the machine loses at
                most that window);
  cursor        the highest seq up to which every item is settled: written to MLflow, or
                refused for good and dead-lettered. Recovery replays only what lies beyond it;
                items beyond it that were settled anyway are written again harmlessly (MLflow
                keeps one row per identical metric point; params and tags are the same values);
  state.json    what recovery needs to write into the same runs: tracking URI, experiment,
                run ids, the job's uid, the last completed round, and whether the job ended;
  lock          held (flock) by the live process: a journal whose lock is free belongs to a
                process that is gone.

The journal is also the queue's overflow: past the queue's memory bound, items live only here
and are read back run by run (server.spill), so memory stays bounded. A line that cannot be
read back (torn by a crash or a full disk) is moved to quarantine.jsonl and counted, never fatal.
Thread-safety: appends take the journal's own lock; readers (the writer thread) read whole lines
below size() on a handle of their own, without it; the sync thread asks the queue for the cursor
before taking it (the queue calls in with its lock held: one lock order).
"""

import collections
import fcntl
import json
import logging
import os
import threading
from pathlib import Path

from fl_lightning_mlflow.server.queue_items import as_item

JOURNAL_DIR = "mlflow_journal"
ITEMS, CURSOR, STATE, LOCK, QUARANTINE = "items.jsonl", "cursor", "state.json", "lock", "quarantine.jsonl"


def parse_line(line: bytes) -> tuple | None:
    """A journal line back as (seq, item) (server.queue_items), or None when it is torn or not an item."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, list) or len(entry) < 2 or not isinstance(entry[0], int):
        return None
    item = as_item(entry[1:])
    return None if item is None else (entry[0], item)


def write_atomic(path: Path, text: str) -> None:
    """Replace path with text: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_cursor(folder) -> int:
    try:
        return int((Path(folder) / CURSOR).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def load_state(folder) -> dict:
    """The journal's state.json ({} when missing or unreadable)."""
    try:
        state = json.loads((Path(folder) / STATE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def save_state(folder, state: dict) -> None:
    write_atomic(Path(folder) / STATE, json.dumps(state, indent=1, default=str))


def try_lock(folder):
    """The journal's lock as an open file if nobody holds it (the caller keeps it to keep the
    lock; closing it releases), else None."""
    f = open(Path(folder) / LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


class JournalBusy(Exception):
    """Another live process holds this journal (its job is running)."""


class JournalWriteError(Exception):
    def __init__(self, seq: int, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.seq, self.error = seq, error


class Journal:
    def __init__(self, folder, stats: collections.Counter, log: logging.Logger, sync_seconds: float = 1.0):
        """stats: the queue's counters (quarantined, journal_* are added here). An
        existing journal (recovery) is appended to, its seqs continued. JournalBusy when a live
        process holds it."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_file = try_lock(self.folder)  # held until close() or the process ends
        if self._lock_file is None:
            raise JournalBusy(f"{self.folder} is held by a live process")
        self.path, self.quarantine_path = self.folder / ITEMS, self.folder / QUARANTINE
        self.stats, self.log = stats, log
        self.sync_seconds = max(0.05, float(sync_seconds))
        self.cursor_fn = None  # set by the queue: the highest seq settled so far
        self._lock = threading.Lock()
        self.next_seq, self._size, self._torn = self._scan_end()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._dirty = False
        self._cursor_written = read_cursor(self.folder)
        self._errors = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, name="mlflow-journal-sync", daemon=True)
        self._thread.start()

    def _scan_end(self) -> tuple:
        """(next seq, file size, whether the last line is unterminated) of an existing journal."""
        last, size, torn = 0, 0, False
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    size += len(line)
                    torn = not line.endswith(b"\n")
                    entry = parse_line(line)
                    if entry:
                        last = max(last, entry[0])
        except FileNotFoundError:
            pass
        return last + 1, size, torn

    # ----- accepting -------------------------------------------------------------------------
    def append(self, item) -> int:
        """Journal item under the next seq and return it. A write that fails (disk full: nothing
        half-written stays in the way of the next line) or an item that is not JSON raises
        JournalWriteError with the seq it was given; the caller keeps the item in memory."""
        ((seq, error, _),) = self.append_many([item])
        if error is not None:
            raise error
        return seq

    def append_many(self, items: list) -> list:
        """Journal items under consecutive seqs in one write: [(seq, None or JournalWriteError,
        the line's byte offset or None)] in their order. One write per batch rather than per item:
        every write releases the GIL, and a handoff to the writer thread per metric point cost more
        than the write itself. An item that is not JSON, or that a failed write did not put on disk whole, gets its
        JournalWriteError (the caller keeps it in memory); the lines written whole stay journaled."""
        with self._lock:
            out, lines, dumps = [], [], json.dumps
            for item in items:
                seq = self.next_seq
                self.next_seq += 1
                try:
                    lines.append((len(out), dumps([seq, *item]) + "\n"))  # ASCII: json.dumps escapes the rest
                    out.append((seq, None))
                except (TypeError, ValueError) as e:
                    out.append((seq, JournalWriteError(seq, e)))
            if not lines:
                return out
            start = self._size
            try:
                if self._torn:  # an earlier write stopped mid-line: end that line first
                    self._write(b"\n")
                    self._torn = False
                    start = self._size
                self._write("".join(line for _, line in lines).encode())
            except OSError as e:
                written = self._size - start
                for i, line in lines:  # the lines on disk whole are journaled; the rest are not
                    if written < len(line):
                        seq = out[i][0]
                        out[i] = (seq, JournalWriteError(seq, e))
                    written -= len(line)
            self._dirty = True
            pos, placed = start, {}
            for i, line in lines:
                placed[i] = pos
                pos += len(line)
            return [(seq, error, placed.get(i) if error is None else None) for i, (seq, error) in enumerate(out)]

    def _write(self, data: bytes) -> None:
        written = 0
        try:
            while written < len(data):
                n = os.write(self._fd, data[written:])
                if n <= 0:
                    raise OSError(28, "No space left on device (short write)")
                written += n
        except OSError:
            self._torn = self._torn or written > 0
            raise
        finally:
            self._size += written

    # ----- reading back (the writer thread; server.spill) ----------------------------------------------
    def size(self) -> int:
        """How many bytes of whole lines the file holds now: a reader stops there."""
        with self._lock:
            return self._size

    def quarantine(self, line: bytes) -> None:
        self.stats["quarantined"] += 1
        try:
            with open(self.quarantine_path, "ab") as q:
                q.write(line if line.endswith(b"\n") else line + b"\n")
        except OSError as e:
            self.log.error(f"MLflow queue: could not keep an unreadable journal line aside: {e}")
        if self.stats["quarantined"] == 1:
            self.log.error(f"MLflow queue: unreadable line(s) in {self.path} moved to {self.quarantine_path}")

    # ----- durability ------------------------------------------------------------------------------
    def sync(self) -> None:
        """fsync what was appended, then record the cursor. Never raises (counted and logged once
        per distinct error)."""
        try:
            cursor = self.cursor_fn() if self.cursor_fn else None  # before our lock: one lock order
            with self._lock:
                if self._dirty:
                    self._dirty = False
                    os.fsync(self._fd)
                    self.stats["journal_syncs"] += 1
            if cursor is not None and cursor != self._cursor_written:
                write_atomic(self.folder / CURSOR, f"{cursor}\n")
                self._cursor_written = cursor
        except Exception as e:  # noqa: BLE001 - the journal must not take the writer down
            self.stats["journal_sync_failures"] += 1
            if str(e) not in self._errors:
                self._errors.add(str(e))
                self.log.error(f"MLflow journal: could not sync {self.folder}: {type(e).__name__}: {e}")

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_seconds):
            self.sync()

    def close(self) -> None:
        """Stop the sync thread, sync a last time, close the file. Never raises."""
        self._stop.set()
        self._thread.join(5)
        self.sync()
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._lock_file.close()  # releases the lock
