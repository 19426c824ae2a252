"""The FL server's algorithm state beside its global model: written after every round, read on resume.

FLARE 2.9 persists only the global model per round (its component snapshots are gone), so a
workflow or generator that keeps more (SCAFFOLD's global control variates, FedOpt's server
optimizer) writes it here itself, in the job's app folder next to FL_global_model.pt, at the
same point of the round (AFTER_LEARNABLE_PERSIST). A continuation job carries the file in its
app/custom (as it carries the model) and its component starts from it.

A state file is a torch pickle of plain tensors and numbers (loaded with weights_only=True):
    {"kind": "scaffold" | "fedopt", "round": the round it ends, ...the component's own keys}
Every failure to read one is ServerStateError, one line naming the file and what is wrong.
"""

import os
from pathlib import Path

import torch

# File names in the server's app folder, and as carried in a continuation's app/custom.
STATE_FILES = {"scaffold": "scaffold_server_state.pt", "fedopt": "fedopt_server_state.pt"}
RESUME_PREFIX = "resume_"


class ServerStateError(ValueError):
    """A server state file that is missing, unreadable or not the one expected: one line."""


def state_path(app_dir, kind: str) -> Path:
    return Path(app_dir) / STATE_FILES[kind]


def save_state(path, kind: str, fl_round: int, state: dict) -> None:
    """Replace path with the state of the round just done: a crash leaves the old file or the
    new one, never half of one (temp file beside it, fsync, os.replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({**state, "kind": kind, "round": int(fl_round)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path, kind: str, fl_round: int | None = None) -> dict:
    """The state in path, checked to be of this kind and (when given) of round fl_round."""
    path = Path(path)
    if not path.is_file():
        raise ServerStateError(f"{path}: no {kind} server state file (the job persisted none)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, foreign pickle: all one answer
        raise ServerStateError(f"{path}: not a readable server state file ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ServerStateError(f"{path}: not a {kind} server state (found {found!r})")
    if not isinstance(state.get("round"), int):
        raise ServerStateError(f"{path}: the {kind} server state names no round")
    if fl_round is not None and state["round"] != fl_round:
        raise ServerStateError(
            f"{path}: the {kind} server state is of round {state['round']}, the global model of round {fl_round}"
        )
    return state


def resume_file(app_root, name: str) -> Path:
    """A file a continuation job carries: absolute as given, else in the app's custom folder
    (where PTFileModelPersistor finds its source_ckpt_file_full_name too)."""
    path = Path(name)
    return path if path.is_absolute() else Path(app_root) / "custom" / path
