"""The write queue's lanes: one per run, served in turn, so one run's backlog never holds another's.

A site that floods its run fills its own lane; the writer takes one request from a lane, then
moves on to the next lane with work, so every other run waits at most one request. The parent
run's lane (the federation's global metrics, models and run end) is served first whenever it has
work. Within a lane the order is the order items were queued.

Actions that concern the whole job (lane None, e.g. creating the run tree) keep their place
against every lane: such an action waits until nothing queued before it is pending in any lane,
and no lane serves an item queued after it until it has run.

A lane's items are in memory, or, past the queue's memory bound, in the journal only (spilled:
counted here, read back by server.spill).
"""

import collections
import itertools

from fl_lightning_mlflow.common.protocol import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, MAX_TAGS_PER_BATCH
from fl_lightning_mlflow.server.queue_items import lane_of

LIMITS = {"metric": MAX_METRICS_PER_BATCH, "param": MAX_PARAMS_PER_BATCH, "tag": MAX_TAGS_PER_BATCH}
SCAN = 20_000  # how far into a lane one request looks (params it must leave for later are skipped)


class Lane:
    __slots__ = ("key", "memory", "spilled", "read_pos", "spill_seq")

    def __init__(self, key):
        self.key = key
        self.memory = collections.deque()  # (seq, item), in queue order
        self.spilled = 0  # items of this lane that live only in the journal
        self.read_pos = 0  # byte offset in the journal where reading them back resumes
        self.spill_seq = 0  # a lower bound of their seqs

    def first_seq(self, unordered: bool = False):
        """The lowest seq pending in this lane, or None."""
        seqs = []
        if self.memory:
            seqs.append(min(s for s, _ in self.memory) if unordered else self.memory[0][0])
        if self.spilled:
            seqs.append(self.spill_seq)
        return min(seqs) if seqs else None


class Lanes:
    def __init__(self, call_lanes: dict | None = None, priority=None):
        """call_lanes: action name -> index of the run key among its args (others: the whole job).
        priority: the run key served first whenever its lane has work (the parent run)."""
        self.call_lanes = dict(call_lanes or {})
        self.priority = priority
        self.job = Lane(None)
        self.runs: collections.OrderedDict = collections.OrderedDict()  # run key -> Lane, in serving order
        self.in_memory = 0
        self.spilled = 0
        self.unordered = False  # an item kept in memory out of seq order (the journal failed while spilling)
        self.busy: set = set()  # lanes with a request out (several writers: each serves another lane)

    def lane_for(self, item) -> Lane:
        key = lane_of(item, self.call_lanes)
        if key is None:
            return self.job
        lane = self.runs.get(key)
        if lane is None:
            lane = self.runs[key] = Lane(key)
        return lane

    def all(self):
        return [self.job, *self.runs.values()]

    def add(self, seq, item, pos=None) -> None:
        """Queue an item: in memory when pos is None, else spilled (its journal line at byte pos)."""
        lane = self.lane_for(item)
        if pos is None:
            lane.memory.append((seq, item))
            self.in_memory += 1
            return
        if not lane.spilled:
            lane.read_pos, lane.spill_seq = pos, seq
        lane.spilled += 1
        self.spilled += 1

    def pending(self) -> bool:
        return bool(self.in_memory or self.spilled)

    def may_linger(self) -> bool:
        """Whether the writer may wait for more points before a request: nothing spilled, less than
        a full request in memory, and no action waiting at a lane's head."""
        return (
            not self.spilled
            and self.in_memory < MAX_METRICS_PER_BATCH
            and not any(lane.memory and lane.memory[0][1].kind == "call" for lane in self.all())
        )

    def floor(self):
        """The lowest seq pending anywhere, or None."""
        seqs = [s for lane in self.all() if (s := lane.first_seq(self.unordered)) is not None]
        return min(seqs) if seqs else None

    def next(self):
        """(the lane to serve next, the seq its items must stay below or None), or (None, None)."""
        barrier = self.job.first_seq(self.unordered)
        order = self.runs.values()
        if self.priority in self.runs:
            order = itertools.chain([self.runs[self.priority]], order)
        for lane in order:
            first = lane.first_seq(self.unordered)
            if lane not in self.busy and first is not None and (barrier is None or first < barrier):
                return lane, barrier
        # A whole-job action runs alone: once nothing queued before it is pending, nor out.
        ready = barrier is not None and not self.busy and self.job not in self.busy
        # (A lane's first seq may be a lower bound of its spilled items': equal to the action's, its
        # items all come after it, as no two items share a seq.)
        if ready and all((f := lane.first_seq(self.unordered)) is None or f >= barrier for lane in self.runs.values()):
            return self.job, None
        return None, None

    def served(self, lane: Lane) -> None:
        """Another lane's turn next."""
        if lane.key is not None and lane.key in self.runs:
            self.runs.move_to_end(lane.key)

    def read_back(self, lane: Lane, entries: list, consumed: int, pos: int) -> None:
        """What server.spill read of lane's spilled items: entries [(seq, item)] in order, consumed
        of its spilled count (torn lines included), the offset its reader stopped at."""
        lane.memory.extend(entries)
        self.in_memory += len(entries)
        consumed = min(consumed, lane.spilled)
        lane.spilled -= consumed
        self.spilled -= consumed
        lane.read_pos = pos
        if entries:
            lane.spill_seq = entries[-1][0] + 1

    def remove(self, lane: Lane, positions) -> list:
        """Remove the items at these positions of lane's memory; returns them, in order."""
        positions = sorted(p for p in set(positions) if p < len(lane.memory))
        if not positions:
            return []
        head = [lane.memory.popleft() for _ in range(positions[-1] + 1)]
        wanted = set(positions)
        lane.memory.extendleft(reversed([entry for i, entry in enumerate(head) if i not in wanted]))
        self.in_memory -= len(positions)
        return [head[i] for i in positions]

    def kinds_in_memory(self) -> collections.Counter:
        return collections.Counter(item.kind for lane in self.all() for _, item in lane.memory)


def take_request(lane: Lane, barrier) -> list:
    """The next request from lane's memory as [(position, item)]: its head action alone, or points
    for its run within MLflow's limits, queued before barrier (a seq) if there is one.

    A param whose key is already in the request with another value is left for the next one:
    MLflow refuses duplicate keys in one batch, and then refuses it alone, with its own reason."""
    first = lane.memory[0][1]
    if first.kind == "call":
        return [(0, first)]
    counts, params, taken = collections.Counter(), {}, []
    for i, (seq, item) in enumerate(itertools.islice(lane.memory, SCAN)):
        if item.kind == "call" or (barrier is not None and seq > barrier):
            break
        if counts[item.kind] >= LIMITS[item.kind]:
            break  # the request is full for this kind
        if item.kind == "param" and params.setdefault(item.key, item.value) != item.value:
            continue
        counts[item.kind] += 1
        taken.append((i, item))
    return taken
