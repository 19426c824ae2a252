"""Where the items MLflow refuses for good go: one JSON line each, with MLflow's reason.

The file is the record a person reads after the job (the stats file and the log point to it);
the log gets the first few refusals only, the file every one.
"""

import json
import logging
import time
from pathlib import Path

from fl_lightning_mlflow.server.queue_items import POINT_KINDS
from fl_lightning_mlflow.server.tracking_uri import redact_uri

DEAD_LETTER_FILE = "mlflow_dead_letter.jsonl"
LOGGED = 10  # refused points said in the log; actions always


class DeadLetter:
    def __init__(self, path, stats, logger: logging.Logger | None = None):
        """stats: the queue's counters (dead_letter_write_failures is added here)."""
        self.path = Path(path)
        self.stats = stats
        self.log = logger or logging.getLogger(__name__)
        self.recorded = 0

    def record(self, item, run_id, reason, code) -> None:
        run_key = item.run_key if item.kind in POINT_KINDS else None
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_key": run_key,
            "run_id": run_id,
            "item": list(item),
            "error_code": str(code),
            "reason": redact_uri(str(reason))[:2000],
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(entry, default=str) + "\n")
        except (OSError, TypeError, ValueError) as e:
            self.stats["dead_letter_write_failures"] += 1
            self.log.error(f"MLflow queue: could not record a refused item in {self.path}: {e}")
        self.recorded += 1
        if self.recorded <= LOGGED or item.kind == "call":
            what = f"{item.kind} {item.key!r} of {run_key!r}" if run_key is not None else f"action {item.name!r}"
            self.log.warning(f"MLflow refused {what} for good: {entry['reason'][:300]} (in {self.path})")
