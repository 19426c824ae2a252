"""flctl.poc_jobs: after FLARE calls a job finished, wait for its server job process (the
tracker's last writes happen there), bounded, saying so once."""

import subprocess
import sys
import time

from flctl import processes
from flctl.poc import Poc


def job_process(poc, job_id, seconds):
    """A stand-in with the command line shape FLARE gives a server job process."""
    app = poc.prod / "server" / job_id / "app_server"
    app.mkdir(parents=True)
    code = f"import time; time.sleep({seconds})"
    argv = [sys.executable, "-c", code, "-m", "nvflare.private.fed.app.server.runner_process", "-n", job_id]
    proc = subprocess.Popen([*argv, "-r", str(app)])
    deadline = time.monotonic() + 10
    while proc.pid not in processes.naming(poc.prod / "server") and time.monotonic() < deadline:
        time.sleep(0.05)  # its command line shows in /proc a moment after the start
    return proc


def test_returns_once_the_jobs_server_process_is_gone_and_says_so_once(tmp_path):
    said = []
    poc = Poc(tmp_path, say=said.append)
    other = job_process(poc, "other-job", 30)  # another job's process is not waited for
    proc = job_process(poc, "job-1", 1.5)
    try:
        poc.wait_for_job_process("job-1", limit=30)
        assert proc.poll() is not None and other.poll() is None
        assert said == ["poc: job job-1's server process is finishing (the tracker's last writes)"]
    finally:
        for p in (proc, other):
            p.kill()
            p.wait()


def test_no_process_no_wait_and_a_process_that_stays_is_named_after_the_limit(tmp_path):
    said = []
    poc = Poc(tmp_path, say=said.append)
    poc.wait_for_job_process("job-1", limit=0)
    assert said == []
    proc = job_process(poc, "job-1", 30)
    try:
        poc.wait_for_job_process("job-1", limit=0.6)
        assert proc.poll() is None
        assert said[-1] == "poc: job job-1's server process still runs after 1 s; not waiting longer"
    finally:
        proc.kill()
        proc.wait()
