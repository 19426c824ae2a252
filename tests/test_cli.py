"""flctl's command line: one-line errors, configure, check, the MLflow-server launcher. Fast."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import JOB, REPO, live_processes
from flctl.cli import MODULES, build_parser, main
from flctl.mlflow_server import MlflowServer, free_port

CLIENT = "app/config/config_fed_client.json"


def flctl(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "flctl", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (["simulate", "--sites", "0"], "flctl simulate: argument --sites: must be a positive integer, got '0'"),
        (["poc", "launch"], "flctl poc: argument command: invalid choice: 'launch'"),
        (["mlflow-server", "--port", "70000", "start"], "flctl mlflow-server: argument --port: must be 1-65535"),
        (["prepare-data", "--bogus"], "flctl prepare-data: unrecognized arguments: --bogus"),
        (["nonsense"], "flctl: argument SUBCOMMAND: invalid choice: 'nonsense'"),
        ([], "flctl: no subcommand given"),
        (["rehearse", "--sites", "0"], "flctl rehearse: argument --sites: must be a positive integer, got '0'"),
        (["project", "--bogus"], "flctl project: unrecognized arguments: --bogus"),
        (["screenshots"], "flctl screenshots: the following arguments are required: --tracking-uri, --out"),
    ],
)
def test_argument_errors_are_one_line_and_fail(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(expected), err


def test_a_failure_is_one_line_on_stderr(tmp_path, capsys):
    missing = tmp_path / "no-job"
    assert main(["simulate", "--job", str(missing)]) == 1
    assert (
        capsys.readouterr().err == f"flctl simulate: no job folder jobs/{missing} or {missing} (see ls {REPO}/jobs)\n"
    )


SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # every module's, as flctl registers them


def test_every_module_registers_its_subcommand():
    assert len(MODULES) == len(SUBCOMMANDS)
    assert {"prepare-data", "simulate", "poc", "recover", "screenshots", "project", "rehearse"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_everywhere(sub, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([sub, "--help"])
    assert exit_.value.code == 0 and f"usage: flctl {sub}" in capsys.readouterr().out


def test_configure_copies_and_sets_variables(tmp_path, capsys):
    dest = tmp_path / "job"
    assert main(["configure", str(JOB), str(dest), "server.num_rounds=5", "client.lr=0.05"]) == 0
    assert json.loads((dest / "app/config/config_fed_server.json").read_text())["num_rounds"] == 5
    assert json.loads((dest / CLIENT).read_text())["lr"] == 0.05
    assert main(["configure", "hello-lightning-mlflow", str(dest), "client.learning_rate=1"]) == 1
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith("flctl configure: setting 'client.learning_rate': ") and "has no variable" in err


def test_check_refuses_a_bad_job_with_one_line_per_problem(tmp_path):
    job = tmp_path / "job"
    assert main(["configure", str(JOB), str(job), "server.num_rounds=0"]) == 0
    (job / CLIENT).write_text('{\n  "local_epochs": 1,,\n}\n')
    result = flctl("check", job, "--no-data")
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line == f"flctl check: {job / CLIENT}:2:21: invalid JSON: Expecting property name enclosed in double quotes"


def test_scripts_pass_errors_through_as_one_line():
    result = subprocess.run(
        ["bash", str(REPO / "scripts/run_simulator.sh"), "--rounds", "zero"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("flctl simulate: argument --rounds: must be a positive")


def server_processes(folder) -> dict:
    return {pid: argv for pid, argv in live_processes().items() if any(str(folder) in a for a in argv)}


@pytest.mark.slow  # two real `mlflow server` starts with basic auth: about 25 s
def test_mlflow_server_start_status_stop_with_auth_over_a_stale_pid_file(tmp_path):
    folder, port = tmp_path / "mlflow-server", free_port()
    folder.mkdir()
    stranger = subprocess.Popen(["sleep", "60"])  # a PID file naming someone else's process (PID reuse)
    (folder / "server.pid").write_text(f"{stranger.pid}\n")
    try:
        started = flctl("mlflow-server", "--dir", folder, "--port", port, "start")
        assert started.returncode == 0, started.stderr
        assert "removing stale PID file" in started.stdout and stranger.poll() is None  # not signalled
        for name in ("credentials", "auth.ini", "server.env"):
            assert (folder / name).stat().st_mode & 0o777 == 0o600, name
        password = (folder / "credentials").read_text().split("MLFLOW_TRACKING_PASSWORD=")[1].strip()
        assert not [argv for argv in server_processes(folder).values() if password in " ".join(argv)]
        again = flctl("mlflow-server", "--dir", folder, "--port", port, "start")
        assert again.returncode == 0 and "already running" in again.stdout  # idempotent
        status = flctl("mlflow-server", "--dir", folder, "status")
        assert status.returncode == 0 and f"at http://127.0.0.1:{port}" in status.stdout
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
    finally:
        stopped = flctl("mlflow-server", "--dir", folder, "stop")
        stranger.kill()
        stranger.wait()
    assert stopped.returncode == 0 and stopped.stdout.strip() == "mlflow-server: stopped"
    assert not (folder / "server.pid").exists() and server_processes(folder) == {}
    status = flctl("mlflow-server", "--dir", folder, "status")
    assert status.returncode == 3 and status.stdout.strip() == "mlflow-server: not running"


def test_the_server_caches_a_checked_password_and_an_older_folder_gets_the_cache_once(tmp_path):
    said = []
    fresh = MlflowServer(tmp_path / "fresh", auth=True, say=said.append)
    fresh.folder.mkdir()
    fresh.ensure_secrets()
    ini = (fresh.folder / "auth.ini").read_text()
    assert ini.count("auth_cache_ttl_seconds = 60") == 1 and not [m for m in said if "added" in m]
    # A folder from before the cache: its auth.ini gains the line once, stays mode 600, is said.
    old = MlflowServer(tmp_path / "old", auth=True, say=said.append)
    old.folder.mkdir()
    old.ensure_secrets()
    (old.folder / "auth.ini").write_text(ini.replace("auth_cache_ttl_seconds = 60\n", ""))
    old.ensure_secrets()
    old.ensure_secrets()
    text = (old.folder / "auth.ini").read_text()
    assert text.count("auth_cache_ttl_seconds = 60") == 1 and text.count("admin_password") == 1
    assert (old.folder / "auth.ini").stat().st_mode & 0o777 == 0o600
    added = f"mlflow-server: added 'auth_cache_ttl_seconds = 60' to {old.folder}/auth.ini"
    assert [m for m in said if "added" in m] == [added]


def test_stop_never_signals_a_process_that_is_not_the_server(tmp_path):
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    stranger = subprocess.Popen(["sleep", "60"])
    (folder / "server.pid").write_text(f"{stranger.pid}\n")
    try:
        assert MlflowServer(folder).stop() is False
        assert stranger.poll() is None and not (folder / "server.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()
    (folder / "server.pid").write_text("999999999\n")  # a dead PID
    assert MlflowServer(folder).running_pid() is None


def test_poc_start_can_be_told_to_leave_a_dead_servers_tracking_alone():
    from flctl.cli import build_parser

    args = build_parser().parse_args(["poc", "--no-recover", "start"])
    assert args.command == "start" and args.no_recover is True
    assert build_parser().parse_args(["poc", "start"]).no_recover is False  # recovery is the default


def test_policy_init_writes_a_starting_policy_that_check_accepts(tmp_path, capsys):
    path = tmp_path / "local" / "disclosure_policy.json"
    assert main(["policy", "init", str(path), "--name", "site-1 v1"]) == 0
    assert json.loads(path.read_text())["name"] == "site-1 v1"
    assert main(["policy", "init", str(path)]) == 1  # never over an admin's edits unless told
    assert capsys.readouterr().err == f"flctl policy: {path} exists; --force to replace it\n"
    assert main(["policy", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: policy 'site-1 v1' (") and "lets out metrics all;" in out


def test_policy_check_prints_one_line_per_problem_naming_the_file(tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"metrics": {"allow": "*loss*"}, "datasets": {"disclose": "some"}, "sytem": 1}))
    assert main(["policy", "check", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith(f"{path}: ") for line in err)
    assert any("metrics.allow: must be a list of name patterns" in line for line in err)
    path.write_text("{not json")
    assert main(["policy", "check", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"disclosure policy {path}: not JSON: ")


def test_simulate_refuses_a_bad_site_policy_before_anything_starts(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--site-policy", "site-1"])
    assert "argument --site-policy: must be SITE=FILE" in capsys.readouterr().err
    from flctl.simulate import place_policies

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"system_metrics": "no"}))
    with pytest.raises(Exception, match=r"site-1's policy: .*system_metrics: must be true or false"):
        place_policies(tmp_path / "ws", {"site-1": bad})
    good = tmp_path / "good.json"
    good.write_text("{}")
    place_policies(tmp_path / "ws", {"site-2": good})
    assert (tmp_path / "ws" / "local" / "disclosure_policy.site-2.json").read_text() == "{}"
