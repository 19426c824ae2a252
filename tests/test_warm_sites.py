"""flctl.warm_sites and flctl.warm_simulator: parked site workers, how they stop, how a worker is
reached, and which simulator flctl simulate runs. Real processes on 127.0.0.1; the end-to-end
run through FLARE's simulator is in test_warm_sites_e2e."""

import subprocess
import sys
import textwrap
import time

import pytest

from flctl.simulate import shown_command, simulator_command
from flctl.warm_sites import MIN_FREE_MEMORY, ParkedWorkers, WarmSiteRunner, Worker, available_memory_share, stop_worker

# A stand-in for simulator_worker's side of the protocol: listen, then stop on False.
LISTENER = textwrap.dedent("""
    import sys, time
    from multiprocessing.connection import Listener
    with Listener(("localhost", int(sys.argv[1]))) as listener:
        conn = listener.accept()
        if sys.argv[2] == "obeys":
            while conn.recv():
                pass
        else:
            time.sleep(60)  # a worker that does not answer
""")


def free_port() -> int:
    from nvflare.fuel.utils.network_utils import get_open_ports

    return get_open_ports(1)[0]


def worker(site: str, behaviour: str = "obeys") -> Worker:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", LISTENER, str(port), behaviour])
    return Worker(site, process, WarmSiteRunner.connect(port, process, timeout=30))


def fake(site: str) -> Worker:
    return Worker(site, None, None)


def test_available_memory_is_read_from_meminfo_and_unknown_counts_as_plenty(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n")
    assert available_memory_share(meminfo) == 0.25
    assert available_memory_share(tmp_path / "missing") == 1.0
    meminfo.write_text("MemTotal: lots\n")
    assert available_memory_share(meminfo) == 1.0


def test_the_least_recently_parked_worker_makes_room_once_keep_are_parked():
    parked = ParkedWorkers(keep=2, memory_share=lambda: 1.0)
    a, b, c = fake("site-1"), fake("site-2"), fake("site-3")
    assert parked.park(a) == [] and parked.park(b) == []
    assert parked.park(c) == [a]
    assert parked.take("site-1") is None and parked.take("site-2") is b
    assert len(parked) == 1 and parked.drain() == [c] and len(parked) == 0


def test_keep_zero_parks_nothing_as_flares_own_turns():
    parked = ParkedWorkers(keep=0, memory_share=lambda: 1.0)
    a = fake("site-1")
    assert parked.park(a) == [a] and len(parked) == 0


def test_low_memory_stops_every_parked_worker_and_parks_no_new_one():
    share = [1.0]
    parked = ParkedWorkers(keep=None, memory_share=lambda: share[0])
    a, b, c = fake("site-1"), fake("site-2"), fake("site-3")
    parked.park(a), parked.park(b)
    share[0] = MIN_FREE_MEMORY / 2
    assert parked.park(c) == [a, b, c] and len(parked) == 0


def test_a_stopped_worker_is_told_to_stop_and_exits_by_itself():
    w = worker("site-1", "obeys")
    started = time.monotonic()
    stop_worker(w, release=10, end=10)
    assert w.process.returncode == 0 and time.monotonic() - started < 10


def test_a_worker_that_does_not_stop_is_ended_after_the_grace():
    w = worker("site-1", "hangs")
    stop_worker(w, release=0.2, end=5)
    assert w.process.returncode == -15  # SIGTERM, after the release grace


def test_stopping_a_worker_that_is_gone_already_is_quiet():
    w = worker("site-1", "obeys")
    w.process.kill()
    w.process.wait()
    stop_worker(w, release=0.2, end=0.2)
    assert w.process.returncode == -9


def test_a_worker_that_exits_before_it_listens_is_named_in_one_line():
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"^the simulator worker exited \(3\) before it listened$"):
        WarmSiteRunner.connect(free_port(), process, timeout=30)


def test_a_worker_that_never_listens_is_ended_after_the_timeout():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    port = free_port()
    with pytest.raises(RuntimeError, match=rf"^the simulator worker did not listen on port {port} within 0.3 s$"):
        WarmSiteRunner.connect(port, process, timeout=0.3)
    assert process.wait(timeout=10) == -9


def test_a_worker_told_to_go_on_keeps_running_until_told_to_stop():
    w = worker("site-1", "obeys")
    w.conn.send(True)  # go on: the next task
    time.sleep(0.2)
    assert w.process.poll() is None
    stop_worker(w)
    assert w.process.returncode == 0


@pytest.mark.parametrize(
    ("sites", "threads", "cold", "warm"),
    [(4, 2, False, True), (4, None, False, False), (4, 4, False, False), (4, 8, False, False), (4, 2, True, False)],
)
def test_flctl_simulate_keeps_workers_only_with_fewer_threads_than_sites(sites, threads, cold, warm):
    cmd = simulator_command(sites, threads, cold)
    assert (cmd[1:] == ["-m", "flctl.warm_simulator"]) is warm
    assert (cmd[-1] == "simulator") is not warm
    assert shown_command(sites, threads, cold) == ("python -m flctl.warm_simulator" if warm else "nvflare simulator")


def test_warm_simulator_refuses_a_negative_keep_and_an_nvflare_it_does_not_know(monkeypatch, capsys):
    import nvflare

    from flctl import warm_simulator

    with pytest.raises(SystemExit) as e:
        warm_simulator.main(["job", "-n", "2", "-t", "1", "--keep-workers", "-1"])
    assert e.value.code == 2 and "--keep-workers must be 0 or more, not -1" in capsys.readouterr().err
    monkeypatch.setattr(nvflare, "__version__", "3.0.0")
    assert warm_simulator.main(["job", "-n", "2", "-t", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flctl.warm_simulator: nvflare 3.0.0 is not 2.9.x") and "\n" not in err
