"""How many metric points one site may stream: a rate with a burst allowance (a token bucket).

Both sides keep it. The site's own outbound keeps to it before anything leaves the site (what it
holds back is counted as throttled, reported with its sent counts); the FL server enforces it
again for whatever arrives over it (a site running other code), with twice the burst, so that
what a site's own budget let through is never throttled on the way by events that arrive
bunched. Throttled points are counted, never journaled nor written: one site's volume cannot
cost the other sites their data (server.lanes keeps their turns; this keeps the volume bounded).

The default is generous: a site logging 50 values at every step at 40 steps a second stays
within it, and a burst of 50,000 points (a long validation pass logged at once) goes through.
Params and tags are not budgeted (each event holds at most MAX_ITEMS_PER_EVENT of them).
"""

import threading
import time

DEFAULT_BUDGET = {"points_per_second": 2000, "burst": 50_000}
SERVER_BURST_FACTOR = 2


class BudgetError(ValueError):
    """A budget setting that is not one (one line naming it)."""


class StreamBudget:
    def __init__(self, points_per_second: float, burst: int, clock=time.monotonic):
        self.rate, self.burst = float(points_per_second), int(burst)
        self._clock = clock
        self._tokens, self._at = float(self.burst), clock()
        self._lock = threading.Lock()  # the site's sampler thread sends beside the task's
        self.throttled = 0  # points held back so far

    @classmethod
    def parse(cls, spec, where: str, burst_factor: int = 1):
        """A budget from its config form {"points_per_second": r, "burst": b} (None: the default;
        {} or r = 0: no budget, returns None). BudgetError names what is wrong and where."""
        spec = DEFAULT_BUDGET if spec is None else spec
        if not isinstance(spec, dict) or set(spec) - set(DEFAULT_BUDGET):
            raise BudgetError(f"{where} must be an object with points_per_second and burst, got {spec!r}")
        if not spec or not spec.get("points_per_second"):
            return None
        rate, burst = spec.get("points_per_second"), spec.get("burst", DEFAULT_BUDGET["burst"])
        for name, value in (("points_per_second", rate), ("burst", burst)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise BudgetError(f"{where}.{name} must be a number > 0, got {value!r}")
        return cls(rate, int(burst) * burst_factor)

    def take(self, n: int) -> int:
        """How many of n points may go now (the first ones); the rest are counted as throttled."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            allowed = min(n, int(self._tokens))
            self._tokens -= allowed
            self.throttled += n - allowed
            return allowed

    def describe(self) -> str:
        return f"{self.rate:g} points/s with a burst of {self.burst}"
