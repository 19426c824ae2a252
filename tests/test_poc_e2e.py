"""POC mode end to end: real FL server and site processes, an MLflow server with basic auth.

Driven through the thin scripts (scripts/poc.sh, scripts/mlflow_server.sh run flctl). Asserts
what the deployment promises: the runs, metrics and params arrive on the tracking
server exactly as in the simulator; only the FL server's processes hold the credentials; an
unauthenticated request is refused; nothing the scripts started is left running.
"""

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, live_processes, tracked_runs
from flctl import nvflare_cli
from flctl.job_store import job_status
from flctl.mlflow_server import MlflowServer, free_port
from flctl.poc import Poc
from user_job import KEY_METRIC, NAME, write_user_job

pytestmark = pytest.mark.slow
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def script(name, *args, timeout=600, trace=False):
    """Run a script; with trace, under `bash -x` and return its trace (every command it ran) too."""
    bash = ["bash", "-x"] if trace else ["bash"]
    result = subprocess.run(
        [*bash, str(REPO / "scripts" / name), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{name} {args}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return (result.stdout, result.stderr) if trace else result.stdout


class Sampler(threading.Thread):
    """Every command line on the machine, sampled every 200 ms while running."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen, self.done = set(), threading.Event()

    def run(self):
        while not self.done.is_set():
            self.seen |= command_lines()
            self.done.wait(0.2)


def processes_under(folder: Path) -> dict:
    """pid -> (command line, environment variable names) of live processes whose command line names folder."""
    out = {}
    for pid, argv in live_processes().items():
        cmdline = " ".join(argv)
        if str(folder) + "/" in cmdline:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            out[pid] = (cmdline, {e.split(b"=", 1)[0].decode() for e in environ if b"=" in e})
    return out


def command_lines() -> set:
    """What `ps` shows: the command line of every process on the machine."""
    return {" ".join(argv) for argv in live_processes().values()}


def summary(client, parent, children):
    def metrics(run):
        # system/ series follow each run's wall time, not what was trained: not compared
        keys = [k for k in run.data.metrics if not k.startswith("system/")]
        return {k: len(client.get_metric_history(run.info.run_id, k)) for k in keys}

    return {
        "parent": (metrics(parent), sorted(parent.data.params), parent.info.status),
        **{site: (metrics(run), sorted(run.data.params), run.info.status) for site, run in children.items()},
    }


def test_poc_cycle_tracks_like_the_simulator_with_credentials_on_the_server_only(
    offline_data, tmp_path, finished_run, monkeypatch
):
    server_dir, port = tmp_path / "mlflow-server", free_port()
    uri = f"http://127.0.0.1:{port}"
    workspace = tmp_path / "poc"
    poc = ["--workspace", workspace, "--data-root", offline_data, "--tracking-uri", uri]
    poc += ["--credentials", server_dir / "credentials"]
    script("mlflow_server.sh", "--dir", server_dir, "--port", port, "start")
    try:
        assert oct((server_dir / "credentials").stat().st_mode & 0o777) == "0o600"
        started = time.monotonic()
        script("poc.sh", *poc, "prepare")
        sampler = Sampler()
        sampler.start()
        # Traced: every command the script runs, with its arguments expanded.
        _, start_trace = script("poc.sh", *poc, "start", trace=True)
        script("poc.sh", *poc, "submit")
        # Watch every POC process while the job runs, the job's own processes included.
        seen = {}
        waiter = subprocess.Popen(
            ["bash", str(REPO / "scripts/poc.sh"), *map(str, poc), "wait"],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        while waiter.poll() is None:
            seen.update(processes_under(workspace / "poc"))
            time.sleep(0.5)
        assert waiter.returncode == 0, waiter.stdout.read()
        script("poc.sh", *poc, "download")
        # A team's own module and DataModule (tests/user_job.py), by configuration alone, on the same
        # POC system: its data of another shape, its lower-is-better key metric.
        first_job = (workspace / "last_job_id").read_text().strip()
        user = write_user_job(tmp_path / "acme-job", tmp_path / "scans")
        user_poc = ["--workspace", workspace, "--tracking-uri", uri, "--credentials", server_dir / "credentials"]
        user_poc += ["--job", user, "--rounds", 3]
        script("poc.sh", *user_poc, "submit")
        script("poc.sh", *user_poc, "wait")
        script("poc.sh", *poc, "stop")
        sampler.done.set()
        sampler.join()  # its last sample is in before anyone reads it
        print(f"POC cycle: {time.monotonic() - started:.0f} s")

        assert processes_under(workspace / "poc") == {}  # nothing left running
        # FLARE shipped the package through `nvflare job submit` (its zip) to every site: each
        # site's copy of the job holds every file of custom/fl_lightning_mlflow, byte for byte.
        package = REPO / "custom" / "fl_lightning_mlflow"
        sources = sorted(p.relative_to(package) for p in package.rglob("*.py"))
        for site in ("site-1", "site-2"):
            (shipped,) = (workspace / "poc/example_project/prod_00" / site).glob(
                f"{first_job}/app_{site}/custom/fl_lightning_mlflow"
            )
            assert sorted(p.relative_to(shipped) for p in shipped.rglob("*.py")) == sources, site
            assert all((shipped / f).read_bytes() == (package / f).read_bytes() for f in sources), site
        server_side = [env for cmd, env in seen.values() if "server_train" in cmd or "/server/" in cmd]
        site_side = [(cmd, env) for cmd, env in seen.values() if "client_train" in cmd or "/site-" in cmd]
        assert server_side and len(site_side) >= 2
        assert all("MLFLOW_TRACKING_PASSWORD" in env for env in server_side)
        for cmd, env in site_side:
            assert not env & set(CREDENTIAL_VARS), f"credentials in a site process: {cmd[:120]}"
        # The password is on no command line and in no log, job folder or result.
        password = dict(line.split("=", 1) for line in (server_dir / "credentials").read_text().splitlines())[
            "MLFLOW_TRACKING_PASSWORD"
        ]
        assert len(sampler.seen) > 10 and not [cmd for cmd in sampler.seen if password in cmd]
        # The traced start passes the credentials file's name only: flctl reads it and puts the
        # values in the FL server's environment, so the password is nowhere in the trace.
        assert "--credentials" in start_trace and password not in start_trace
        files = [path for path in workspace.rglob("*") if path.is_file() and not path.is_symlink()]
        assert len(files) > 20
        assert not [path for path in files if password.encode() in path.read_bytes()]

        # An unauthenticated request is refused.
        request = urllib.request.Request(
            f"{uri}/api/2.0/mlflow/experiments/search",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401

        # With the credentials: the same runs, metrics and params as the simulator run.
        for line in (server_dir / "credentials").read_text().splitlines():
            key, _, value = line.partition("=")
            monkeypatch.setenv(key, value)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("hello-lightning-mlflow")
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("role") == "federation"]
        children = {r.data.tags["site"]: r for r in runs if r.data.tags.get("role") == "site"}
        sim_client, (sim_parent,), sim_children = tracked_runs(finished_run[0])
        assert summary(client, parent, children) == summary(sim_client, sim_parent, sim_children)
        assert client.search_model_versions("name='hello-lightning-mlflow-global'")

        # The team's job: their names as logged, the champion the round with the lowest key metric.
        user_runs = client.search_runs([client.get_experiment_by_name(NAME).experiment_id])
        (user_parent,) = [r for r in user_runs if r.data.tags.get("role") == "federation"]
        for run in [r for r in user_runs if r.data.tags.get("role") == "site"]:
            assert {"train/mse", "val/mse", "val/mae", f"global_{KEY_METRIC}"} <= set(run.data.metrics)
        history = {m.step: m.value for m in client.get_metric_history(user_parent.info.run_id, f"global_{KEY_METRIC}")}
        assert sorted(history) == [0, 1, 2]
        champion = client.get_model_version_by_alias(f"{NAME}-global", "champion")
        assert champion.tags["round"] == str(min(history, key=history.get))
    finally:
        subprocess.run(
            ["bash", str(REPO / "scripts/poc.sh"), "--workspace", str(workspace), "stop"],
            capture_output=True,
            timeout=120,
        )
        script("mlflow_server.sh", "--dir", server_dir, "--port", port, "stop")
        assert not os.path.exists(server_dir / "server.pid")
        assert processes_under(server_dir) == {}


def find_dicts(value):
    """Every dict inside a JSON answer."""
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from find_dicts(v)
    elif isinstance(value, list):
        for v in value:
            yield from find_dicts(v)


def journal_points(journal_file: Path) -> dict:
    """run key -> {(key, step, value, timestamp)} of the metric points a job's journal accepted."""
    points = {}
    for line in journal_file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line the kill tore: never accepted in full
        if entry[1] == "metric":
            _, _, run_key, key, value, timestamp, step = entry
            points.setdefault(run_key, set()).add((key, step, float(value), timestamp))
    return points


def strictly_increasing(history) -> bool:
    steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
    return all(a < b for a, b in zip(steps, steps[1:], strict=False))


def poc_sh(*args, timeout=600, ok=True) -> subprocess.CompletedProcess:
    """scripts/poc.sh as a user types it, printed with what it printed and how long it took (the
    issue note's sample); with ok, it must succeed."""
    started = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "scripts/poc.sh"), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    took = time.monotonic() - started
    command = f"$ scripts/poc.sh {' '.join(map(str, args))}"
    print(f"{command}\n{result.stdout}{result.stderr}(exit {result.returncode}, {took:.0f} s)")
    assert not ok or result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


ROUNDS, KILL_AFTER = 5, 2


def test_fl_server_killed_mid_round_is_recovered_and_resumed_into_its_runs(offline_data, tmp_path):
    """Issues 11 and 24 end to end, the worst case: the tracking server goes down during round 2
    of a 5-round job, then the FL server's processes are SIGKILLed in the middle of round 3, so
    records were accepted that MLflow never confirmed. Both come back: `start` recovers what the
    journal accepted, once, the runs end FAILED naming round 2 and FLARE no longer lists the job
    RUNNING; `resume` then trains rounds 3 and 4 from round 2's global model into the same runs:
    one parent, global metrics at steps 0..4 once each, every site series strictly increasing in
    step, all runs FINISHED, the champion the best of all five rounds. The continuation is the job
    submitted after the crash that issue 11 asks to run normally: FLARE completes it and its
    tracking ends FINISHED with nothing lost (that a fresh job gets runs of its own, the cycle test
    above shows on a POC system; a second job here would cost a submit, a check and a job start)."""
    workspace = tmp_path / "poc"
    prod = workspace / "poc/example_project/prod_00"
    tracking = MlflowServer(tmp_path / "mlflow-server", free_port())
    tracking.start()
    poc = ["--workspace", workspace, "--data-root", offline_data, "--tracking-uri", tracking.uri]
    try:
        poc_sh(*poc, "prepare")
        poc_sh(*poc, "start")
        assert "poc: already running" in poc_sh(*poc, "start").stdout  # twice: nothing new started
        poc_sh(*poc, "--rounds", ROUNDS, "submit")
        job_id = (workspace / "last_job_id").read_text().strip()
        job_dir = prod / "server" / job_id
        site_log = prod / "site-1" / job_id / "log.txt"

        def wait_for(what, done, timeout=300):
            deadline = time.monotonic() + timeout
            while not done():
                assert time.monotonic() < deadline, f"{what} never came"
                time.sleep(0.1)

        def site_started(fl_round):
            return site_log.is_file() and f"round {fl_round}: training starts" in site_log.read_text()

        wait_for(f"round {KILL_AFTER}", lambda: site_started(KILL_AFTER))
        tracking.kill()  # the tracking server's host goes down first: the sites' points of round 2 on
        # are accepted and journaled, never confirmed. Once round 2 is done and round 3 trains, the
        # server's host goes down: its daemon, its process and the job's process, at once.
        wait_for(f"round {KILL_AFTER + 1}", lambda: site_started(KILL_AFTER + 1))
        server = [pid for pid, (cmd, _) in processes_under(workspace / "poc").items() if f"{prod}/server" in cmd]
        assert server
        for pid in server:
            os.kill(pid, signal.SIGKILL)

        waited = poc_sh(*poc, "wait", timeout=180, ok=False)
        assert waited.returncode != 0
        assert waited.stderr.strip().splitlines()[-1] == (
            f"flctl poc: the FL server stopped during job {job_id}; its log: {prod}/server/log.txt"
        )
        assert processes_under(workspace / "poc") == {}  # the sites were stopped too

        state = json.loads((job_dir / "mlflow_journal/state.json").read_text())
        assert not state["ended"] and state["last_round"] == KILL_AFTER, f"not killed in round 3: {state}"
        accepted = journal_points(job_dir / "mlflow_journal/items.jsonl")

        # Both come back: stale PID files cleared, tracking recovered, the zombie job ended in FLARE.
        tracking.start()
        assert (prod / "server/daemon_pid.fl").exists()
        restarted = poc_sh(*poc, "start")
        assert "stale PID/control file(s)" in restarted.stdout
        assert "poc: server and 2 site(s) running" in restarted.stdout
        assert f"poc: recovery: job {job_id}: " in restarted.stdout and ", 0 lost; runs FAILED" in restarted.stdout
        assert f"poc: job {job_id} was RUNNING when the FL server died; marked FINISHED:ABORTED" in restarted.stdout
        account = json.loads((job_dir / "mlflow_recovery.json").read_text())
        print(f"recovery: {account}")
        assert account["lost"] == {} and account["refused"] == {} and account["replayed"] > 0

        # MLflow holds every point the journal accepted, each once, in the job's own runs.
        client = MlflowClient(tracking.uri)
        reason = (
            f"the FL server stopped after round {KILL_AFTER} (the last completed round); "
            "tracking recovered from its journal"
        )
        for run_key, run_id in state["run_ids"].items():
            run = client.get_run(run_id)
            assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == reason, run_key
            stored = [
                (m.key, m.step, m.value, m.timestamp)
                for key in run.data.metrics
                for m in client.get_metric_history(run_id, key)
            ]
            assert len(stored) == len(set(stored)), f"{run_key}: duplicated points"
            assert set(stored) == accepted.get(run_key, set()), run_key
        parent_id = state["run_ids"]["__parent__"]
        assert [m.step for m in client.get_metric_history(parent_id, "global_val_acc")] == [0, 1, 2]
        print(f"points per run: { {k: len(v) for k, v in accepted.items()} }")

        # FLARE tells the truth.
        admin = Poc(workspace)
        listed = admin.nvflare(["job", "list", "--startup-kit", admin.kit], "list.log", json_out=True)
        entries = [e for e in find_dicts(nvflare_cli.parse_json(listed.stdout)) if job_id in e.values()]
        assert entries and all("RUNNING" not in str(e.values()) for e in entries), listed.stdout[-2000:]
        assert job_status(prod / "server", job_id) == "FINISHED:ABORTED"

        # The job goes on: rounds 3 and 4 from round 2's global model, into the same runs.
        said = poc_sh(*poc, "resume").stdout
        assert (
            f"poc: resume: job {job_id} stopped after round {KILL_AFTER}; rounds {KILL_AFTER + 1}..{ROUNDS - 1} "
            "follow from its last global model, best round "
        ) in said and f"into its runs (parent {parent_id})" in said
        next_id = (workspace / "last_job_id").read_text().strip()
        assert next_id != job_id and f"poc: job {next_id} finished: FINISHED:COMPLETED" in said
        downloaded = poc_sh(*poc, "download").stdout  # judged from the continuation's stats file
        assert "MLflow runs:     status FINISHED;" in downloaded and ", 0 lost" in downloaded

        experiment = client.get_experiment_by_name("hello-lightning-mlflow")
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("role") == "federation"]  # one parent run ...
        children = {r.data.tags["site"]: r for r in runs if r.data.tags.get("role") == "site"}
        assert {"__parent__": parent.info.run_id, **{s: r.info.run_id for s, r in children.items()}} == state[
            "run_ids"
        ]  # ... and the same site runs
        assert parent.data.tags["resumes_job"] == job_id
        for r in [parent, *children.values()]:
            assert r.info.status == "FINISHED", r.data.tags
            assert r.data.tags["continued_by_job"] == next_id and r.data.tags["interrupted"] == reason
            assert "failure_reason" not in r.data.tags
        acc = client.get_metric_history(parent.info.run_id, "global_val_acc")
        assert sorted(m.step for m in acc) == list(range(ROUNDS))  # steps 0..4, once each
        for site, run in children.items():
            for key in run.data.metrics:
                history = client.get_metric_history(run.info.run_id, key)
                assert strictly_increasing(history), (site, key, [(m.timestamp, m.step) for m in history])
        # The champion is the best of all five rounds (round 0 never is: FLARE's selector skips it).
        by_round = {m.step: m.value for m in acc if m.step >= 1}
        best_round = max(by_round, key=lambda r: (by_round[r], -r))
        # FLARE deletes a finished job's folder on the POC server: its stats file is in the download.
        stats = json.loads((workspace / "results" / next_id / "workspace/mlflow_tracking_stats.json").read_text())
        assert stats["best_model"]["round"] == best_round, (stats["best_model"], by_round)
        champion = client.get_model_version_by_alias("hello-lightning-mlflow-global", "champion")
        assert champion.tags["round"] == str(best_round), (champion.tags, by_round)
    finally:
        subprocess.run(["bash", str(REPO / "scripts/poc.sh"), "--workspace", str(workspace), "stop"], timeout=120)
        tracking.stop()
    assert processes_under(workspace / "poc") == {}
