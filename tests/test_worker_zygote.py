"""flctl.worker_zygote: workers forked from one process, each run as `python -m MODULE ARGS` in its
own environment and folder, with their exits and signals seen as Popen's. The zygote here
preloads only `json` (the simulator's preloads torch and Lightning: seconds the tests need not)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from flctl.worker_zygote import ZygoteClient

# A worker stand-in: writes what it was given, then exits with the code asked, or sleeps.
WORKER = textwrap.dedent("""
    import json, os, sys, time
    out, code = sys.argv[1], sys.argv[2]
    with open(out, "w") as f:
        json.dump({"cwd": os.getcwd(), "mark": os.environ.get("MARK"), "argv": sys.argv[1:],
                   "path0": sys.path[0], "name": __name__, "sid": os.getsid(0) == os.getpid()}, f)
    if code == "sleep":
        time.sleep(60)
    sys.exit(int(code))
""")


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    code = tmp_path_factory.mktemp("code")
    (code / "fake_worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
    z = ZygoteClient(env, timeout=60, modules=("json",))
    yield z, env
    z.close()
    assert z.process.returncode == 0 and not os.path.exists(z.folder)


def spawn(zygote, tmp_path, code: str):
    z, env = zygote
    out = tmp_path / "out.json"
    process = z.spawn([sys.executable, "-m", "fake_worker", str(out), code], {**env, "MARK": "site-7"}, str(tmp_path))
    return process, out


def test_a_worker_runs_as_python_dash_m_in_its_own_env_folder_and_session(zygote, tmp_path):
    import json

    process, out = spawn(zygote, tmp_path, "0")
    assert process.wait(timeout=30) == 0
    seen = json.loads(out.read_text())
    assert seen == {"cwd": str(tmp_path), "mark": "site-7", "argv": [str(out), "0"], "path0": str(tmp_path),
                    "name": "__main__", "sid": True}  # fmt: skip


def test_a_workers_exit_code_comes_back(zygote, tmp_path):
    process, _ = spawn(zygote, tmp_path, "3")
    assert process.wait(timeout=30) == 3 and process.poll() == 3


def test_a_worker_is_ended_by_signal_and_the_wait_times_out_before(zygote, tmp_path):
    process, out = spawn(zygote, tmp_path, "sleep")
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.5)
    assert process.poll() is None
    process.terminate()
    assert process.wait(timeout=30) == -signal.SIGTERM
    process.kill()  # gone already: quiet


def test_a_zygote_that_cannot_start_is_one_line_and_leaves_nothing(tmp_path):
    z = ZygoteClient({**os.environ, "PYTHONHOME": str(tmp_path / "nowhere")}, timeout=30, modules=())
    with pytest.raises(RuntimeError, match=r"^the site workers' zygote did not start \(exit \d+\)$"):
        z.spawn([sys.executable, "-m", "json.tool"], dict(os.environ), str(tmp_path))
    z.close()
    assert z.process.poll() is not None and not os.path.exists(z.folder)


def test_closing_a_zygote_never_asked_ends_it(tmp_path):
    z = ZygoteClient(dict(os.environ), timeout=30, modules=())
    z.close()
    assert z.process.poll() is not None and not os.path.exists(z.folder)
