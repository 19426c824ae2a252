"""What the write queue carries: named item types, journaled as plain JSON lists.

Each item is a NamedTuple whose first field names its kind, so the journal keeps the form it
always had ([seq, kind, ...] per line: a journal written before this module reads back the
same) while the code reads fields by name. A "call" is a named action of the queue's owner
(create the runs, log a model, end a run...), retried like any point.

Every item belongs to a lane: a point to its run; an action to the run it names (its
`call_lanes` entry: the index of the run key among its args, or the run key itself), or to no run when it concerns the
whole job (None: it waits for everything queued before it, and everything after waits for it).
The writer serves the lanes in turn (server.lanes), in order within each.
"""

import enum
from typing import NamedTuple

from fl_lightning_mlflow.common.protocol import SYSTEM_PREFIX


class MetricPoint(NamedTuple):
    kind: str  # "metric"
    run_key: str
    key: str
    value: float
    timestamp: int  # ms
    step: int


class ParamItem(NamedTuple):
    kind: str  # "param"
    run_key: str
    key: str
    value: str


class TagItem(NamedTuple):
    kind: str  # "tag"
    run_key: str
    key: str
    value: str


class Action(NamedTuple):
    kind: str  # "call"
    name: str
    args: list


TYPES = {"metric": MetricPoint, "param": ParamItem, "tag": TagItem, "call": Action}
POINT_KINDS = ("metric", "param", "tag")
ARITY = {kind: len(t._fields) for kind, t in TYPES.items()}


class Outcome(enum.Enum):
    """What became of an item the writer sent."""

    WRITTEN = "written"
    REFUSED = "refused"  # for good: in the dead letter


def metric(run_key, key, value, timestamp, step) -> MetricPoint:
    return MetricPoint("metric", run_key, key, value, timestamp, step)


def param(run_key, key, value) -> ParamItem:
    return ParamItem("param", run_key, key, value)


def tag(run_key, key, value) -> TagItem:
    return TagItem("tag", run_key, key, value)


def action(name, args) -> Action:
    return Action("call", name, list(args))


def as_item(fields):
    """A queue item from its plain form (a tuple or a journal line's list), or None when it is not one."""
    kind = fields[0] if fields else None
    item_type = TYPES.get(kind) if isinstance(kind, str) else None
    if item_type is None or len(fields) != ARITY[kind]:
        return None
    if kind != "call" and not isinstance(fields[1], str):
        return None
    return fields if type(fields) is item_type else item_type(*fields)


def counted(item) -> bool:
    """Whether an item counts in a run's delivery account: points, params and tags, but not system/
    metrics (monitoring: sites do not count them either, server.records)."""
    return item.kind in POINT_KINDS and not (item.kind == "metric" and str(item.key).startswith(SYSTEM_PREFIX))


def lane_of(item, call_lanes: dict):
    """The lane an item belongs to: its run key, or for an action the run its args name (None:
    the whole job)."""
    if item.kind != "call":
        return item.run_key
    index = call_lanes.get(item.name)
    if isinstance(index, str):  # an action that always concerns this run
        return index
    if index is None or not isinstance(item.args, (list, tuple)) or len(item.args) <= index:
        return None
    key = item.args[index]
    return key if isinstance(key, str) else None
