"""Processes by PID: a /proc scan instead of pgrep patterns, and ending them gently, then not."""

import os
import signal
import time
from pathlib import Path


def live_processes() -> dict:
    """pid -> argv of every live process on the machine (zombies and vanished ones skipped)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        argv = [a for a in argv if a]
        if argv:  # a zombie has an empty command line
            out[int(proc.name)] = argv
    return out


def naming(path, pattern=None) -> dict:
    """pid -> command line of the processes whose command line names path (as a folder prefix);
    with pattern (a callable on the command line), only those it accepts."""
    folder = str(path).rstrip("/")
    me = os.getpid()
    found = {}
    for pid, argv in live_processes().items():
        line = " ".join(argv)
        names = any(a == folder or folder + "/" in a for a in argv)
        if pid != me and names and (pattern is None or pattern(line)):
            found[pid] = line
    return found


def alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(path) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def wait_gone(pids, timeout: float) -> list:
    """Waits until none of pids is alive, up to timeout; returns those still alive."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    return left


def end(pids, grace: float = 5) -> list:
    """SIGTERM each pid, SIGKILL what is still alive after grace seconds; returns survivors."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        pids = wait_gone(pids, grace)
        if not pids:
            break
    return pids


def end_group(proc, grace: float = 10.0) -> None:
    """End a process group that proc leads (it and everything it started that is still there):
    SIGTERM, then SIGKILL for what is left after grace seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # nothing left
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or the group never looks empty
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
