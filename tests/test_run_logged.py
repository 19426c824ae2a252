"""flctl's process runner (what runs the simulator): a time limit that holds while the command
prints nothing, and nothing it started left behind, whichever way it ends."""

import os
import re
import sys
import time

import pytest

from flctl.simulate import RoundProgress, SimulatorTimeout, run_logged

# A leader that starts a child in its group, prints the child's PID, then does what it is told.
SCRIPT = """
import subprocess, sys, time
child = subprocess.Popen(["sleep", "300"])
print("child", child.pid, flush=True)
print("progress line", flush=True)
if sys.argv[1] == "hang":
    time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def child_pid(text: str) -> int:
    return int(re.search(r"child (\d+)", text).group(1))


def test_a_silent_hang_ends_at_the_limit_with_its_last_lines_and_nothing_left(tmp_path):
    log = tmp_path / "run.log"
    t = time.monotonic()
    with pytest.raises(SimulatorTimeout) as info:
        run_logged([sys.executable, "-c", SCRIPT, "hang"], log_path=log, timeout=2)
    assert time.monotonic() - t < 20  # not 300: the limit holds although nothing is printed
    assert "did not end within 2 s" in str(info.value) and "progress line" in str(info.value)
    pid = child_pid(log.read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_a_normal_exit_returns_the_output_and_ends_what_it_left_running(tmp_path, capsys):
    result = run_logged([sys.executable, "-c", SCRIPT, "exit"], show=re.compile("progress"), timeout=60, linger=0.5)
    assert result.returncode == 0 and "progress line" in result.stdout
    assert capsys.readouterr().out.strip() == "progress line"  # only lines matching show are echoed
    assert not alive(child_pid(result.stdout))
    assert os.getpgid(0) != 0  # the runner's own group is untouched
    assert "exited 0; ended what it left running" in result.stdout


def test_simulate_shows_round_by_round_progress_with_a_remaining_estimate():
    now = [100.0]
    progress = RoundProgress(4, clock=lambda: now[0])
    now[0] = 130.0
    assert progress("site-1 - round 0: training starts") == "site-1 - round 0: training starts"
    now[0] = 150.0
    shown = progress("ScatterAndGather - aggregating 2 update(s) at round 0")
    assert shown.splitlines() == [
        "ScatterAndGather - aggregating 2 update(s) at round 0",
        "flctl: round 1 of 4 done; 50 s elapsed, about 60 s of rounds left",  # 20 s a round, 3 to go
    ]
    assert progress("ScatterAndGather - aggregating 2 update(s) at round 0") == (
        "ScatterAndGather - aggregating 2 update(s) at round 0"  # FLARE's second logger: counted once
    )
    now[0] = 160.0
    assert progress("aggregating 2 update(s) at round 1").endswith(
        "round 2 of 4 done; 60 s elapsed, about 30 s of rounds left"
    )
    assert progress("some other line") is None
