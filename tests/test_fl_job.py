"""jobs/fl_job.py: the job built with FLARE's Job API (FedJob) is the hand-written hello-lightning-mlflow."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import JOB, REPO
from flctl.check_job import resolve, variables

FL_JOB = REPO / "jobs" / "fl_job.py"
STRUCTURE = {"format_version", "workflows", "components", "executors", "task_data_filters", "task_result_filters"}


@pytest.fixture(scope="module")
def fl_job():
    spec = importlib.util.spec_from_file_location("fl_job", FL_JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(fl_job, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    assert fl_job.main(["--export", str(out)]) == 0
    return out / "hello-lightning-mlflow"


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def apps(job: Path) -> tuple[dict, dict]:
    """(server config, client config) of a job folder, whichever apps FedJob made: one app for @ALL,
    or one per target (app_server, app_site-1, ...; every site's client config must then be the same)."""
    servers, clients = [], []
    for app in read(job / "meta.json")["deploy_map"]:
        config = job / app / "config"
        if (config / "config_fed_server.json").is_file():
            servers.append(read(config / "config_fed_server.json"))
        if (config / "config_fed_client.json").is_file():
            clients.append(read(config / "config_fed_client.json"))
    assert len(servers) == 1 and clients, (servers, clients)
    assert all(c == clients[0] for c in clients), "the sites' apps differ"
    return servers[0], clients[0]


def top_variables(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in STRUCTURE}


def entries(config: dict, key: str) -> set:
    """{(id, path, resolved args as JSON)} of config[key] (components or workflows)."""
    names = variables(config)  # FLARE's {var} substitution, as flctl check resolves it
    return {(c["id"], c["path"], json.dumps(resolve(c.get("args", {}), names), sort_keys=True)) for c in config[key]}


def executors(config: dict) -> list:
    names = variables(config)
    return sorted(
        (
            sorted(e["tasks"]),
            e["executor"]["path"],
            json.dumps(resolve(e["executor"].get("args", {}), names), sort_keys=True),
        )
        for e in config["executors"]
    )


def dotted(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if "." in k:
                yield f"{path}.{k}"
            yield from dotted(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from dotted(v, f"{path}[{i}]")


def test_help_imports_nothing_heavy():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['fl_job.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(FL_JOB)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = ('torch', 'nvflare', 'pytorch_lightning', 'lightning', 'mlflow', 'numpy', 'fl_lightning_mlflow')\n"
        "print('IMPORTED', sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--module-args" in done.stdout and "--workspace" in done.stdout
    assert "IMPORTED []" in done.stdout, done.stdout[-500:]


def test_server_has_the_hand_written_jobs_components_and_workflows(exported):
    ours, theirs = apps(exported)[0], apps(JOB)[0]
    assert entries(ours, "components") == entries(theirs, "components")
    assert entries(ours, "workflows") == entries(theirs, "workflows")
    assert [w["id"] for w in ours["workflows"]] == [w["id"] for w in theirs["workflows"]]  # they run in order


def test_sites_have_the_hand_written_jobs_components_and_executor(exported):
    ours, theirs = apps(exported)[1], apps(JOB)[1]
    assert entries(ours, "components") == entries(theirs, "components")
    assert executors(ours) == executors(theirs)
    # The one difference FedJob leaves: it writes an executor without an "id" (the hand-written job
    # names it "executor"). FLARE does not use it; flctl check-job names the executor "?" in messages.
    assert [set(e["executor"]) for e in ours["executors"]] == [{"path", "args"}]


def test_top_level_variables_and_meta_are_the_hand_written_jobs(exported):
    # The same variables: `flctl configure` / `flctl simulate` set them on the exported job as on ours.
    for ours, theirs in zip(apps(exported), apps(JOB), strict=True):
        assert top_variables(ours) == top_variables(theirs)
        assert {k: ours.get(k) or [] for k in ("task_data_filters", "task_result_filters")} == {
            "task_data_filters": [],
            "task_result_filters": [],
        }
    assert read(exported / "meta.json") == read(JOB / "meta.json")


def test_the_export_ships_the_code_and_no_yml_and_has_no_dotted_keys(exported):
    custom = exported / "app" / "custom"
    for package in ("fl_lightning_mlflow", "cifar10_example"):
        source = REPO / "custom" / package
        want = {p.relative_to(source) for p in source.rglob("*.py")}
        assert {p.relative_to(custom / package) for p in (custom / package).rglob("*.py")} == want
    assert not [p for p in custom.rglob("*") if p.suffix in (".yml", ".yaml") or p.name == "__pycache__"]
    for config in exported.rglob("*.json"):
        assert not list(dotted(read(config))), config


def test_another_module_and_a_min_key_metric(fl_job, tmp_path):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text("class Net:\n    pass\n")
    (package / "settings.yml").write_text("a: 1\n")  # left out: a .yml under app/custom breaks `nvflare job submit`
    argv = ["--module", "mypkg.model.Net", "--module-args", '{"hidden": 8, "lr": "{lr}"}']
    argv += ["--datamodule", "mypkg.model.Data", "--datamodule-args", '{"root": "{data_root}"}']
    argv += ["--custom-dir", str(package), "--key-metric", "val_loss", "--key-metric-mode", "min"]
    argv += ["--rounds", "3", "--sites", "3", "--lr", "0.1", "--name", "my-job", "--export", str(tmp_path / "out")]
    assert fl_job.main(argv) == 0
    job = tmp_path / "out" / "my-job"
    server, client = apps(job)
    engine = next(c for c in client["components"] if c["id"] == "engine")["args"]
    assert engine["module"] == {"path": "mypkg.model.Net", "config_type": "dict", "args": {"hidden": 8, "lr": "{lr}"}}
    assert engine["datamodule"]["args"] == {"root": "{data_root}"}
    assert client["lr"] == 0.1 and client["key_metric"] == "val_loss" and client["key_metric_mode"] == "min"
    assert server["key_metric"] == "global_val_loss" and server["key_metric_mode"] == "min"
    assert server["num_rounds"] == 3 and server["min_clients"] == 3 and read(job / "meta.json")["min_clients"] == 3
    persistor = next(c for c in server["components"] if c["id"] == "persistor")["args"]
    # The server builds the initial model with the module's args, the sites' variables put in.
    assert persistor["model"]["args"]["module"]["args"] == {"hidden": 8, "lr": 0.1}
    custom = job / "app" / "custom"
    assert (custom / "mypkg" / "model.py").is_file() and not (custom / "mypkg" / "settings.yml").exists()
    assert (custom / "fl_lightning_mlflow" / "site" / "executor.py").is_file()  # the job's own code ships anyway


def test_refuses_an_argument_the_class_does_not_take(fl_job):
    with pytest.raises(TypeError, match="takes no argument"):
        fl_job.configured("nvflare.app_opt.pt.file_model_locator.PTFileModelLocator", persistor_id="persistor")


@pytest.mark.slow
def test_the_exported_job_runs_in_flctl_simulate(exported, offline_data, tmp_path):
    from flctl.simulate import simulate

    run = simulate(
        exported,
        tmp_path / "ws",
        offline_data,
        sites=2,
        rounds=2,
        epochs=1,
        prepare=False,
        evaluate=False,
        say=lambda msg: None,
        show=None,
        timeout=600,
    )
    assert run.outcome.ok, (run.outcome.problems, run.log[-3000:])
    assert run.outcome.rounds_done == 2


@pytest.mark.slow
def test_workspace_runs_the_job_with_fedjobs_simulator_run(offline_data, tmp_path):
    """The FLARE user's path: `python3 fl_job.py ... --workspace DIR` (FedJob.simulator_run)."""
    argv = [sys.executable, str(FL_JOB), "--data-root", str(offline_data), "--workspace", str(tmp_path / "ws")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert log.count("aggregating 2 update(s) at round") == 2
    server = tmp_path / "ws" / "server" / "simulate_job" / "app_server"
    assert (server / "FL_global_model.pt").is_file() and (server / "best_FL_global_model.pt").is_file()
