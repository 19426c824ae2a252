"""The federation's own timings per round, for the parent run (no FLARE, no MLflow).

fl/round_duration_seconds      from the round's start to its end (aggregation and saving included)
fl/slowest_site_wait_seconds   from the first accepted update to the last: how long the round
                               waited for its slowest site once the fastest was done
fl/update_size_bytes           the bytes of the updates accepted in the round (all sites)
"""

import time

import numpy as np

PREFIX = "fl/"


def update_bytes(data) -> int:
    """The bytes of the arrays in an update: a dict of arrays, or nested (a DXO collection's parts,
    anything with a .data dict)."""
    if hasattr(data, "data") and isinstance(data.data, dict):
        data = data.data
    if isinstance(data, dict):
        return sum(update_bytes(v) for v in data.values())
    if isinstance(data, np.ndarray):
        return int(data.nbytes)
    if hasattr(data, "nbytes"):  # a torch tensor or another array type
        return int(data.nbytes)
    return 0


class RoundTimings:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.started, self.arrivals, self.size = None, [], 0

    def start(self) -> None:
        self.started, self.arrivals, self.size = self.clock(), [], 0

    def accepted(self, nbytes: int) -> None:
        self.arrivals.append(self.clock())
        self.size += int(nbytes)

    def done(self) -> list:
        """[(name, value)] for the round that just ended; nothing if its start was not seen."""
        if self.started is None:
            return []
        now = self.clock()
        points = [(PREFIX + "round_duration_seconds", now - self.started), (PREFIX + "update_size_bytes", self.size)]
        if self.arrivals:
            points.append((PREFIX + "slowest_site_wait_seconds", max(self.arrivals) - min(self.arrivals)))
        self.started = None
        return points
