"""Reading spilled items back from the journal, lane by lane (server.lanes).

Past the queue's memory bound every new item lives only in the journal until read back. Each
lane reads its own items back from where it stopped, skipping other lanes' lines with a byte
test before any JSON is parsed, so a flooded lane's million lines cost the other lanes a scan,
not a parse, and each line is looked at once per lane. Readers run on the writer thread, on a
file handle of their own, below the size of whole lines the journal has written: they never
take the lock the FL server's event thread appends under.

A line that is not an item (torn by a crash or a full disk) is quarantined once, whichever lane
meets it first, and counted.
"""

import collections
import json

from fl_lightning_mlflow.server.journal import parse_line
from fl_lightning_mlflow.server.queue_items import lane_of

CALL_MARK = b', "call", '


def marker(key) -> bytes:
    """What a point line of this run holds right after its kind: `, "<key>", `."""
    return b", " + json.dumps(key).encode() + b", "


def whole(line: bytes) -> bool:
    return line.startswith(b"[") and line.endswith(b"]\n")


class SpillReader:
    def __init__(self, journal, call_lanes: dict):
        self.journal = journal
        self.call_lanes = call_lanes
        self.quarantined: set = set()  # offsets of lines already kept aside

    def _own(self, line: bytes, pos: int, key, mark):
        """(seq, item) when line is one of key's items, None when it is another lane's; quarantines
        a line that is no item (returns False)."""
        if not whole(line) or ((mark is None or mark not in line) and CALL_MARK not in line[:40]):
            if whole(line):
                return None
            entry = None
        else:
            entry = parse_line(line)
            if entry is not None:
                return entry if lane_of(entry[1], self.call_lanes) == key else None
        if pos not in self.quarantined:
            self.quarantined.add(pos)
            self.journal.quarantine(line)
        return False

    def read(self, key, start: int, spilled: int, want: int, end: int) -> tuple:
        """Up to `want` of lane key's items from byte start, its `spilled` items all lying below end:
        (entries [(seq, item)], how many of its spilled items that accounts for, where to resume).
        Reaching end before finding them all means the rest were torn: they are accounted for."""
        entries, mark = [], marker(key) if key is not None else None
        try:
            f = open(self.journal.path, "rb")
        except OSError as e:
            self._missing(spilled, e)
            return [], spilled, start
        with f:
            f.seek(start)
            pos, eof = start, False
            while pos < end and len(entries) < want:
                line = f.readline()
                if not line:
                    eof = True  # the file is shorter than written (cut by hand or by a crash): the file is the truth
                    break
                entry = self._own(line, pos, key, mark)
                pos += len(line)
                if entry:
                    entries.append(entry)
        consumed = spilled if pos >= end or eof else len(entries)
        return entries, consumed, pos

    def kinds(self, key, start: int, spilled: int, end: int) -> collections.Counter:
        """What lane key's spilled items are, by kind, without reading them back ("unreadable" for
        those that cannot be read)."""
        counts, mark, found = collections.Counter(), marker(key) if key is not None else None, 0
        try:
            with open(self.journal.path, "rb") as f:
                f.seek(start)
                pos = start
                while pos < end and found < spilled:
                    line = f.readline()
                    if not line:
                        break
                    pos += len(line)
                    mine = whole(line) and (mark is None or mark in line or CALL_MARK in line)
                    entry = parse_line(line) if mine else 0
                    if entry is None:
                        counts["unreadable"] += 1
                    elif entry and lane_of(entry[1], self.call_lanes) == key:
                        counts[entry[1].kind] += 1
                    else:
                        continue
                    found += 1
        except OSError:
            pass
        if found < spilled:
            counts["unreadable"] += spilled - found
        return counts

    def scan_beyond(self, cursor: int, lanes) -> int:
        """Recovery: every journaled item beyond cursor becomes a spilled item of its lane (lines
        that are no item are quarantined at once). Returns how many lines lie beyond it."""
        count, pos = 0, 0
        with open(self.journal.path, "rb") as f:
            for line in f:
                entry = parse_line(line) if whole(line) else None
                if entry is None or entry[0] > cursor:
                    count += 1
                    if entry is None:
                        self.quarantined.add(pos)
                        self.journal.quarantine(line)
                    else:
                        lanes.add(entry[0], entry[1], pos)
                pos += len(line)
        return count

    def _missing(self, spilled: int, error) -> None:
        self.journal.stats["spill_missing"] += spilled
        path = self.journal.path
        self.journal.log.error(f"MLflow queue: journal {path} unreadable ({error}); {spilled} item(s) gone")
