"""The write queue's overflow: items past its memory bound, in order, in a JSON-lines file.

Once the queue spills, every newer item goes to the file too, so the order holds; the writer
reads the oldest lines back when memory runs empty. A line that cannot be read back (torn by
a crash or a full disk) is moved to a quarantine file beside it and counted, never fatal.
Not thread-safe on its own: the queue calls it with its lock held.
"""

import collections
import json
import logging
from pathlib import Path

# Queue items, as WriteQueue makes them: ("metric", run_key, key, value, timestamp_ms, step),
# ("param"|"tag", run_key, key, value), ("call", name, args).
ARITY = {"metric": 6, "param": 4, "tag": 4, "call": 3}


def parse_item(line: str) -> tuple | None:
    """A spilled line back as a queue item, or None when it is torn or not an item."""
    try:
        item = json.loads(line)
    except ValueError:
        return None
    if not isinstance(item, list) or not item or ARITY.get(item[0]) != len(item):
        return None
    if item[0] != "call" and not isinstance(item[1], str):
        return None
    return tuple(item)


class SpillFile:
    def __init__(self, path, stats: collections.Counter, log: logging.Logger):
        """stats: the queue's counters (spilled, quarantined, spill_missing are added here)."""
        self.path = Path(path)
        self.quarantine_path = self.path.with_name(self.path.stem + "_quarantine.jsonl")
        self.stats, self.log = stats, log
        self.count = 0  # items in the file not yet read back
        self._read_pos = 0

    def append(self, item) -> None:
        """Raises OSError (disk full), TypeError/ValueError (not JSON): the caller keeps the item."""
        line = json.dumps(item) + "\n"  # before opening: an unserializable item leaves the file intact
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line)
        self.count += 1
        self.stats["spilled"] += 1

    def pending(self) -> collections.Counter:
        """What is still in the file, by kind; unreadable lines (or file) count as "unreadable"."""
        counts = collections.Counter()
        if not self.count:
            return counts
        try:
            with open(self.path) as f:
                f.seek(self._read_pos)
                for line in f:
                    item = parse_item(line)
                    counts[item[0] if item else "unreadable"] += 1
        except OSError:
            counts["unreadable"] += self.count
        return counts

    def read_into(self, memory: collections.deque, fill_to: int) -> None:
        """Move the oldest spilled items into memory, up to fill_to items there (at least one)."""
        try:
            f = open(self.path)
        except FileNotFoundError:  # removed under us: nothing to read back; say how much went
            self.stats["spill_missing"] += self.count
            self.log.error(f"MLflow queue: spill file {self.path} vanished with {self.count} items")
            self.count, self._read_pos = 0, 0
            return
        with f:
            f.seek(self._read_pos)
            while len(memory) < fill_to or not memory:
                line = f.readline()
                if not line:
                    # The count and the file disagree (a torn line swallowed the next one's newline):
                    # the file is the truth.
                    self.count = 0
                    break
                self.count -= 1
                item = parse_item(line)
                if item is None:
                    self._quarantine(line)
                else:
                    memory.append(item)
            self._read_pos = f.tell()
        if self.count <= 0:
            self.count = 0
            self.path.unlink(missing_ok=True)
            self._read_pos = 0

    def _quarantine(self, line: str) -> None:
        self.stats["quarantined"] += 1
        try:
            with open(self.quarantine_path, "a") as q:
                q.write(line if line.endswith("\n") else line + "\n")
        except OSError as e:
            self.log.error(f"MLflow queue: could not keep an unreadable spill line aside: {e}")
        if self.stats["quarantined"] == 1:
            self.log.error(f"MLflow queue: unreadable line(s) in {self.path} moved to {self.quarantine_path}")
