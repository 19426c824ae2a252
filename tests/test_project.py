"""flctl project: project.yml written and checked from a short description; provisioning; the
rehearsal's parts that need no namespace (its refusal without root, the userinfo refusal, the
comparison of MLflow trees, netns's names)."""

import subprocess
import sys

import pytest
import yaml

from flctl import netns, rehearsal
from flctl.errors import CliError
from flctl.poc import Poc, refuse_userinfo
from flctl.project import ProjectError, check_description, description_from_args, provision, write_project


def good() -> dict:
    return {
        "name": "hello-fl",
        "server": {"host": "fl.example.org", "org": "coordinator", "port": 8102},
        "sites": [{"name": "site-1", "org": "hospital_a"}, {"name": "site-2", "org": "bank_b"}],
        "admins": [
            {"email": "admin@coordinator.org", "org": "coordinator", "role": "project_admin"},
            {"email": "lead@hospital-a.org", "org": "hospital_a", "role": "lead"},
            {"email": "m@bank-b.org", "org": "bank_b", "role": "member"},
        ],
    }


def flctl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flctl", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_good_description_gives_flare_project(tmp_path):
    out = write_project(good(), tmp_path / "project.yml")
    project = yaml.safe_load(out.read_text())
    assert project["api_version"] == 3 and project["name"] == "hello-fl"
    by_name = {p["name"]: p for p in project["participants"]}
    assert by_name["fl.example.org"] == {
        "name": "fl.example.org",
        "type": "server",
        "org": "coordinator",
        "fed_learn_port": 8102,
    }
    assert by_name["site-2"] == {"name": "site-2", "type": "client", "org": "bank_b"}
    assert by_name["lead@hospital-a.org"]["role"] == "lead"
    assert [b["path"].rsplit(".", 1)[1] for b in project["builders"]] == [
        "WorkspaceBuilder",
        "StaticFileBuilder",
        "CertBuilder",
        "SignatureBuilder",
    ]


@pytest.mark.parametrize(
    "change, line",
    [
        (lambda d: d["sites"].append({"name": "site-1", "org": "x"}), "site 'site-1': duplicate name (also site)"),
        (
            lambda d: d["admins"].append({"email": "lead@hospital-a.org", "org": "x", "role": "lead"}),
            "admin 'lead@hospital-a.org': duplicate name (also admin)",
        ),
        (lambda d: d["admins"][1].update(role="boss"), "admin 'lead@hospital-a.org': unknown role 'boss'"),
        (lambda d: d["sites"][1].pop("org"), "site 'site-2': no organisation (org)"),
        (lambda d: d["admins"][2].update(email="m@bank"), "admin 'm@bank': not an e-mail address"),
        (lambda d: d["admins"][2].update(email="not-an-email"), "admin 'not-an-email': not an e-mail address"),
        (lambda d: d["sites"][0].update(org="hospital-a"), "org 'hospital-a': letters, digits or '_' only"),
        (lambda d: d["server"].update(host="fl_server!"), "server host 'fl_server!': not a valid host name"),
        (lambda d: d["server"].update(port=70000), "server port 70000"),
        (lambda d: d.pop("server"), "server: a host name is needed"),
        (lambda d: d.update(sites=[]), "sites: at least one site is needed"),
        (lambda d: d["admins"][1].update(role="project_admin"), "exactly one project_admin is needed, found 2"),
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
        (lambda d: d["sites"].append("site-3"), "sites #3: must be a mapping"),
    ],
)
def test_each_bad_definition_is_one_line(change, line):
    description = good()
    change(description)
    problems = check_description(description)
    assert len(problems) == 1, problems
    assert line in problems[0]


def test_all_problems_reported_nothing_written(tmp_path):
    description = good()
    description["sites"][1] = {"name": "site-1"}  # duplicate, and no org
    description["admins"][1]["role"] = "owner"
    with pytest.raises(ProjectError) as e:
        write_project(description, tmp_path / "project.yml")
    assert len(e.value.problems) == 3
    assert not (tmp_path / "project.yml").exists()
    assert check_description(["not", "a", "mapping"]) == ["the description must be a mapping, got list"]


def test_command_line_one_line_per_problem(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({**good(), "sites": [{"name": "site-1"}, {"name": "site-1", "org": "a"}]}))
    done = flctl("project", bad, "--out", tmp_path / "p.yml")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "flctl project: site 'site-1': no organisation (org)",
        "flctl project: site 'site-1': duplicate name (also site)",
        "flctl project: 2 problem(s); nothing written",
    ]
    assert not (tmp_path / "p.yml").exists()
    done = flctl("project", tmp_path / "missing.yml")
    assert done.returncode == 1 and done.stderr.startswith("flctl project: cannot read")
    bad.write_text("sites: [unclosed\n")
    done = flctl("project", bad)
    assert done.returncode == 1 and "is not YAML" in done.stderr and len(done.stderr.splitlines()) == 1


def test_description_from_arguments():
    d = description_from_args("fl.example.org", ["site-1:hospital_a", "site-2"], ["a@b.org:hospital_a:project_admin"])
    assert d["sites"] == [{"name": "site-1", "org": "hospital_a"}, {"name": "site-2"}]
    assert check_description(d) == ["site 'site-2': no organisation (org)"]
    with pytest.raises(ProjectError, match="expected EMAIL:ORG:ROLE"):
        description_from_args("fl.example.org", [], ["a@b.org:lead"])


def test_provision_builds_signed_kits(tmp_path):
    """Real `nvflare provision` (about 2 s): one kit per participant, all from one root CA."""
    done = flctl(
        "project",
        "--server",
        "fl.example.org",
        "--site",
        "site-1:hospital_a",
        "--admin",
        "admin@coordinator.org:coordinator:project_admin",
        "--out",
        tmp_path / "project.yml",
        "--provision",
        tmp_path / "ws",
    )
    assert done.returncode == 0, done.stderr
    prod = tmp_path / "ws" / "hello-fl" / "prod_00"
    assert f"startup kits in {prod}" in done.stdout
    for kit, files in {
        "fl.example.org": ("fed_server.json", "server.crt", "server.key", "rootCA.pem"),
        "site-1": ("fed_client.json", "client.crt", "client.key", "rootCA.pem"),
        "admin@coordinator.org": ("fed_admin.json", "client.crt", "client.key", "rootCA.pem"),
    }.items():
        for name in files:
            assert (prod / kit / "startup" / name).is_file(), (kit, name)
    ca = {(prod / k / "startup" / "rootCA.pem").read_bytes() for k in ("fl.example.org", "site-1")}
    assert len(ca) == 1


def test_provision_failure_is_one_line(tmp_path):
    project = tmp_path / "project.yml"
    project.write_text(yaml.safe_dump({"name": "x", "api_version": 3, "participants": []}))
    with pytest.raises(CliError, match="nvflare provision failed; see .*provision.log"):
        provision(project, tmp_path / "ws")


def test_userinfo_in_tracking_uri_refused_before_anything(tmp_path):
    with pytest.raises(CliError) as e:
        refuse_userinfo("http://admin:s3cret@mlflow.example.org:5000")
    text = str(e.value)
    assert "s3cret" not in text and "***@" in text and "credentials file" in text and "--credentials" in text
    refuse_userinfo("http://mlflow.example.org:5000")
    refuse_userinfo(None)
    # Poc.submit says so before it even looks for a running system.
    poc = Poc(tmp_path, tracking_uri="https://u:p@mlflow.example.org")
    with pytest.raises(CliError, match="carries user:password@; nothing was submitted"):
        poc.submit()


def test_compare_contents_names_each_difference():
    a = {"runs": {"parent": {"params": {"x": "1"}, "series": {"m": 3}}, "site-1": {"params": {}, "series": {}}}}
    b = {"runs": {"parent": {"params": {"x": "2"}, "series": {"m": 4, "n": 1}}}}
    assert rehearsal.compare_contents(a, b) == [
        "run site-1: only in the deployment",
        "run parent: param x: '1' vs '2'",
        "run parent: series m: 3 vs 4 points",
        "run parent: series n: None vs 1 points",
    ]
    assert rehearsal.compare_contents(a, a) == []
    # clock-sampled system metrics: compared by presence, not by count
    timed = {"runs": {"site-1": {"params": {}, "series": {"system/cpu_utilization_percentage": 1}}}}
    assert rehearsal.compare_contents(timed, {"runs": {"site-1": {"params": {}, "series": {}}}}) == [
        "run site-1: series system/cpu_utilization_percentage: 1 vs None points"
    ]
    twice = {"runs": {"site-1": {"params": {}, "series": {"system/cpu_utilization_percentage": 2}}}}
    assert rehearsal.compare_contents(timed, twice) == []


def test_rehearsal_without_root_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(rehearsal.os, "geteuid", lambda: 1000)
    assert "needs root" in rehearsal.preconditions()
    with pytest.raises(CliError, match="needs root"):
        rehearsal.Rehearsal("/tmp/flr-unused").up()


def test_network_names_and_hosts_files():
    net = netns.Network(
        {"server": ("10.9.0.1", ["fl.x"]), "site-1": ("10.9.0.11", ["s1.x"])},
        ("server", "10.9.1.1", "tracking", "10.9.1.2", ["mlflow.x"]),
        prefix="flr-t-",
    )
    assert net.names() == ["flr-t-lan", "flr-t-server", "flr-t-site-1", "flr-t-tracking"]
    assert "10.9.1.2 mlflow.x" in net.hosts_file("server")
    assert "mlflow.x" not in net.hosts_file("site-1")  # a site cannot even name the tracking host
    assert "10.9.1.1 fl.x" in net.hosts_file("tracking")
    assert net.exec_prefix("site-1") == ["ip", "netns", "exec", "flr-t-site-1"]
