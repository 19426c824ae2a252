"""Where a site keeps its SCAFFOLD controls c_i so that a continuation of its job finds them again.

A job's folder on a site is new for every job (its id differs), and a continuation is a new job,
so c_i are kept in the site's workspace instead (its root: a POC or provisioned site's
workspace, the simulator's <sim workspace>/<site>), under the lineage the server names in every
SCAFFOLD train task (server.scaffold_workflow: one id for a job and all its continuations):

    <site workspace>/scaffold_controls/<lineage>.pt   {round: c_i after that round}

The last KEEP_ROUNDS rounds are kept: a server that died after a site sent round r (its c_i of
round r written) but before it aggregated has the continuation train round r again, from c_i of
round r - 1. Written atomically (temp file + os.replace). A file that cannot be read counts as
none: the site says so in one line and starts from zero controls, as a new SCAFFOLD site does.
"""

import os
import re
from pathlib import Path

import torch

STORE_DIR = "scaffold_controls"
KEEP_ROUNDS = 2
LINEAGE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # a file name, nothing that walks out of the folder


class ScaffoldStore:
    def __init__(self, site_root, lineage: str):
        if not isinstance(lineage, str) or not LINEAGE.match(lineage):
            raise ValueError(f"SCAFFOLD: the task's lineage {lineage!r} is not a plain id")
        self.path = Path(site_root) / STORE_DIR / f"{lineage}.pt"

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(k, int) for k in state):
            raise ValueError("not a {round: controls} table")
        return state

    def load(self, fl_round: int) -> tuple:
        """(c_i after fl_round or None, a line saying why none, or None when found)."""
        try:
            controls = self._read().get(fl_round)
        except Exception as e:  # noqa: BLE001 - truncated or foreign: the same answer, no controls
            return None, f"{self.path}: unreadable ({type(e).__name__}: {str(e)[:120]})"
        if controls is None:
            return None, f"{self.path}: no controls of round {fl_round}"
        return controls, None

    def save(self, fl_round: int, controls: dict) -> None:
        try:
            kept = self._read()
        except Exception:  # noqa: BLE001 - an unreadable table is replaced by a good one
            kept = {}
        kept[int(fl_round)] = {k: v.detach().cpu().clone() for k, v in controls.items()}
        kept = {r: kept[r] for r in sorted(kept)[-KEEP_ROUNDS:]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(kept, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
