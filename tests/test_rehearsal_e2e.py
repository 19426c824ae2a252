"""The deployment rehearsal end to end: provisioned kits, every host in its own network namespace,
MLflow with basic auth on PostgreSQL reachable from the FL server alone. One rehearsal (one job,
2 sites, 1 round, offline data) is shared by the module; each security check is its own test,
run against the live hosts; teardown must leave no namespace and no process behind.

Needs root (network namespaces) and PostgreSQL; without them every test skips with the one-line
reason. Hosts are the namespaces' own addresses (10.213.0.0/24, 10.213.1.0/30): nothing here
talks to the network outside this machine.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from flctl import netns, rehearsal

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(offline_data):
    why = rehearsal.preconditions()
    if why:
        pytest.skip(why)
    # PostgreSQL runs as the postgres user: its folder must be reachable to it, unlike pytest's
    # temporary folders (mode 700).
    folder = Path(tempfile.mkdtemp(prefix="flr-test-"))
    os.chmod(folder, 0o755)
    lines = []
    r = rehearsal.Rehearsal(folder, sites=2, rounds=1, epochs=1, data_root=offline_data, timeout=1800, say=lines.append)
    try:
        r.up()
        r.run_job()
        yield r, lines
    finally:
        try:
            r.down()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        # Nothing of ours left: no namespace (their interfaces go with them), no hosts file.
        assert netns.ours() == [], f"namespaces left: {netns.ours()}"
        assert not list(netns.ETC_NETNS.glob(netns.PREFIX + "*")), "hosts files left in /etc/netns"


def check(r, name):
    ok, line = rehearsal.CHECKS[name](r)
    print(f"{name}: {line}")
    assert ok, line
    return line


def test_job_ran_and_tracking_complete(live):
    r, lines = live
    assert any("finished: FINISHED:COMPLETED" in line for line in lines), lines
    assert any("0 lost" in line for line in lines), lines


def test_site_cannot_reach_tracking_server(live):
    line = check(live[0], "site cannot reach tracking")
    assert "server -> tracking: connected" in line


def test_credentials_only_in_fl_server_processes(live):
    r, _ = live
    assert r.scan["scans"] >= 2  # scanned while the job ran, not only afterwards
    check(r, "credentials only on the FL server")


def test_fl_server_refuses_plaintext(live):
    check(live[0], "FL server refuses plaintext")


def test_site_of_another_provisioning_refused(live):
    check(live[0], "site of another CA refused")


def test_member_cannot_submit(live):
    line = check(live[0], "member cannot submit")
    assert "not authorized for 'submit_job'" in line  # FLARE's refusal of the right, not any failure


def test_tracking_uri_with_userinfo_refused(live):
    line = check(live[0], "user:password@ URI refused")
    assert "credentials file" in line


def test_mlflow_tree_matches_simulator(live):
    r, _ = live
    diffs = r.compare()
    print(r.report["comparison"])
    assert diffs == [], diffs
