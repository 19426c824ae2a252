"""The deployment rehearsal end to end: provisioned kits, every host in its own network namespace,
MLflow with basic auth on PostgreSQL reachable from the FL server alone. One rehearsal (one job,
2 sites, 1 round, offline data) is shared by the module; each security check is its own test,
run against the live hosts; teardown must leave no namespace and no process behind.

Needs root (network namespaces) and PostgreSQL; without them every test skips with the one-line
reason. Hosts are the namespaces' own addresses (10.213.0.0/24, 10.213.1.0/30): nothing here
talks to the network outside this machine.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from flctl import netns, rehearsal
from test_site_policy_e2e import POLICY, SITE_1_METRICS

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
    # site-1's admin puts a disclosure policy in its kit's local/ folder (issue 25); site-2 has none.
    policy = folder / "site-1-policy.json"
    policy.write_text(json.dumps(POLICY))
    r = rehearsal.Rehearsal(folder, sites=2, rounds=1, epochs=1, data_root=offline_data, timeout=1800,
                            say=lines.append, site_policies={"site-1": policy})  # fmt: skip
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


def test_site_1s_policy_in_its_kit_holds(live):
    r, _ = live
    assert (r.prod / "site-1/local/disclosure_policy.json").is_file()
    assert not (r.prod / "site-2/local/disclosure_policy.json").exists()
    line = check(r, "site policies held")
    assert line.startswith(f"site-1: {len(SITE_1_METRICS)} series (") and "all let out by" in line
    runs = r.deployed_contents()["runs"]
    assert set(runs["site-1"]["series"]) == SITE_1_METRICS
    assert {"val_acc", "system/cpu_utilization_percentage"} <= set(runs["site-2"]["series"])


def test_mlflow_tree_matches_simulator(live):
    r, _ = live
    diffs = r.compare()
    print(r.report["comparison"])
    assert diffs == [], diffs
