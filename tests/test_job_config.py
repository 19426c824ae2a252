"""The hand-written job folder: JSON, class paths, the shipped site code, configure_job."""

import importlib
import json
import os

import pytest

from conftest import JOB, REPO
from fl_lightning_mlflow.common.protocol import GLOBAL_PREFIX
from flctl.configure import JobConfigError, configure_job

CONFIGS = [JOB / "meta.json", JOB / "app/config/config_fed_server.json", JOB / "app/config/config_fed_client.json"]
# Every job folder under jobs/: FedAvg (Lightning, plain PyTorch), FedProx, SCAFFOLD, FedOpt.
JOBS = sorted(p.name for p in (REPO / "jobs").iterdir() if (p / "meta.json").is_file())
ALL_CONFIGS = [
    REPO / "jobs" / job / rel
    for job in JOBS
    for rel in ("meta.json", "app/config/config_fed_server.json", "app/config/config_fed_client.json")
]


def walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def class_paths():
    for config in ALL_CONFIGS:
        for where, key, value in walk(json.loads(config.read_text())):
            if key == "path" and isinstance(value, str):
                yield f"{config.parent.parent.parent.name}/{config.name}:{where}", value


@pytest.mark.parametrize("where,class_path", list(class_paths()))
def test_every_class_path_imports(where, class_path, monkeypatch):
    # As FLARE loads it: the job's own app/custom first (a user's module lives there).
    monkeypatch.syspath_prepend(str(REPO / "jobs" / where.split("/")[0] / "app" / "custom"))
    module, _, name = class_path.rpartition(".")
    assert getattr(importlib.import_module(module), name), where


def test_configs_parse_and_have_no_dotted_keys():
    # `nvflare job submit` turns "a.b" keys into nested objects (see the README).
    for config in ALL_CONFIGS:
        for where, key, _ in walk(json.loads(config.read_text())):
            assert "." not in key, f"{config.name}: dotted key {key!r} at {where or '/'}"


def test_key_metric_is_one_the_sites_report():
    server = json.loads(CONFIGS[1].read_text())
    # The executor reports the LightningModule's "val_acc" for the received global model under this name.
    assert server["key_metric"] == f"{GLOBAL_PREFIX}val_acc"


def test_every_job_is_there():
    expected = {"hello-lightning-mlflow", "hello-pt-mlflow", "hello-lightning-fedprox", "hello-lightning-scaffold"}
    expected.add("hello-lightning-fedopt")
    assert expected <= set(JOBS)
    for job in JOBS:  # each its own job name and MLflow experiment
        assert json.loads((REPO / "jobs" / job / "meta.json").read_text())["name"] == job
        server = json.loads((REPO / "jobs" / job / "app/config/config_fed_server.json").read_text())
        assert server["experiment_name"] == job and server["registered_model_name"] == f"{job}-global"


# What each job ships besides the package: the CIFAR-10 example's code (a link), or the user's own.
USER_CODE = {job: ["cifar10_example"] for job in JOBS} | {"hello-lightning-tabular": ["tabular_regression"]}


@pytest.mark.parametrize("job", JOBS)
def test_the_job_carries_the_package_as_one_link_to_custom(job):
    # One source of truth: app/custom holds relative links to the package (and to the CIFAR-10
    # example, which lives once in custom/), and the user's code; the command-line package
    # (flctl: data preparation, checks) is not shipped to the sites.
    shipped = REPO / "jobs" / job / "app" / "custom"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(["fl_lightning_mlflow", *USER_CODE[job]])
    for name in ("fl_lightning_mlflow", "cifar10_example"):
        link = shipped / name
        if name in ("fl_lightning_mlflow", *USER_CODE[job]) and (REPO / "custom" / name).is_dir():
            assert link.is_symlink() and os.readlink(link) == f"../../../../custom/{name}"
            assert link.resolve() == (REPO / "custom" / name).resolve()
    user_code = shipped / USER_CODE[job][0]
    if not (REPO / "custom" / USER_CODE[job][0]).is_dir():  # a user's own code: real files in the job
        assert user_code.is_dir() and not user_code.is_symlink()


def test_the_algorithm_jobs_differ_from_fedavg_only_where_the_algorithm_does():
    def configs(job):
        return [
            json.loads((REPO / "jobs" / job / "app/config" / f).read_text())
            for f in ("config_fed_server.json", "config_fed_client.json")
        ]

    fedavg_server, fedavg_client = configs("hello-lightning-mlflow")
    server, client = configs("hello-lightning-fedprox")
    assert client["fedprox_mu"] == server["fedprox_mu"] > 0  # the sites' mu is what the parent run records
    engine = next(c for c in client["components"] if c["id"] == "engine")
    assert engine["args"].pop("fedprox_mu") == "{fedprox_mu}"
    assert client.pop("fedprox_mu") and client == fedavg_client
    tracker = next(c for c in server["components"] if c["id"] == "mlflow_tracker")["args"]
    assert tracker["fl_params"]["algorithm"] == "FedProx" and tracker["fl_params"]["fedprox_mu"] == "{fedprox_mu}"
    assert server["workflows"] == fedavg_server["workflows"]

    server, client = configs("hello-lightning-scaffold")
    assert client == fedavg_client  # SCAFFOLD is the server's choice: the task brings the controls
    (workflow,) = [w for w in server["workflows"] if w["id"] == "scatter_and_gather_scaffold"]
    assert workflow["path"].endswith(".ResumableScaffold")  # FLARE's ScatterAndGatherScaffold, its state persisted
    aggregator = next(c for c in server["components"] if c["id"] == "aggregator")["args"]
    assert aggregator["expected_data_kind"] == {"_model_weights_": "WEIGHT_DIFF", "scaffold_c_diff": "WEIGHT_DIFF"}
    tracker = next(c for c in server["components"] if c["id"] == "mlflow_tracker")["args"]
    assert tracker["fl_params"]["algorithm"] == "SCAFFOLD"


def test_configure_job_sets_variables_on_a_copy(tmp_path):
    dest = configure_job(JOB, tmp_path / "job", {"server.num_rounds": 5, "client.data_root": "/data"})
    assert json.loads((dest / "app/config/config_fed_server.json").read_text())["num_rounds"] == 5
    assert json.loads((dest / "app/config/config_fed_client.json").read_text())["data_root"] == "/data"
    assert json.loads(CONFIGS[1].read_text())["num_rounds"] == 2  # the original is untouched
    copied = dest / "app/custom/fl_lightning_mlflow"
    assert not copied.is_symlink() and (copied / "site/executor.py").is_file()  # real files: runs anywhere
    example = dest / "app/custom/cifar10_example"
    assert not example.is_symlink() and (example / "lit_module.py").is_file()


def test_configure_job_refuses_unknown_variables(tmp_path):
    with pytest.raises(JobConfigError, match="has no variable 'num_round'"):
        configure_job(JOB, tmp_path / "job", {"server.num_round": 5})


def test_simulator_concurrency_is_read_from_the_simulator_command_line(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    from fl_lightning_mlflow.site.threads import simulator_concurrency

    cases = {("-n", "4", "-t", "2"): 2, ("-n", "2", "-t", "3"): 2, ("--threads=3", "-c", "a,b,c,d"): 3, ("-n", "3"): 1}
    for args, expected in cases.items():
        script = tmp_path / "simulator.py"  # stands in for the simulator process: only its argv is read
        script.write_text("import time; time.sleep(30)")
        proc = subprocess.Popen([sys.executable, str(script), *args])
        while str(script).encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            time.sleep(0.01)  # until exec has replaced the forked test process
        try:
            assert simulator_concurrency(["worker", "--parent_pid", str(proc.pid)]) == expected, args
        finally:
            proc.kill()
            proc.wait()
    assert simulator_concurrency(["worker"]) == 1  # not started by a simulator


def test_seeded_initial_global_model_is_reproducible():
    import torch

    from cifar10_example.network import CifarNet
    from fl_lightning_mlflow.server.initial_model import initial_model, spec_of

    lit = {"path": "cifar10_example.lit_module.LitCifarNet", "config_type": "dict", "args": {}}
    a, b = initial_model(lit, seed=0).state_dict(), initial_model(lit, seed=0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The plain network's seeded build has the very weights of the LightningModule's: the CIFAR-10
    # jobs' server builds it (no Lightning on the FL server) and the sites load them into LitCifarNet.
    module = {"path": "cifar10_example.network.CifarNet", "config_type": "dict", "args": {}}
    plain = initial_model(module, seed=0).state_dict()
    assert set(plain) == set(a) and all(torch.equal(a[k], plain[k]) for k in a)
    assert all(torch.equal(plain[k], v) for k, v in CifarNet(init_seed=0).state_dict().items())
    assert not all(torch.equal(a[k], initial_model(lit, seed=1).state_dict()[k]) for k in a)
    assert spec_of(initial_model(lit, seed=0)) == {"path": lit["path"], "args": {}}
    server = json.loads(CONFIGS[1].read_text())
    model = server["components"][0]["args"]["model"]
    assert model["path"] == "fl_lightning_mlflow.server.initial_model.initial_model"
    assert model["args"] == {"module": module, "seed": "{seed}"}


def test_initial_model_refuses_a_module_flare_already_built_or_a_bad_seed():
    from fl_lightning_mlflow.server.initial_model import initial_model

    with pytest.raises(ValueError, match=r'^initial_model: module must be .* \(with "config_type": "dict", so that'):
        initial_model({"not": "a spec"})
    with pytest.raises(ValueError, match=r"^initial_model: seed must be an integer or null, got 'x'$"):
        initial_model({"path": "cifar10_example.network.CifarNet", "config_type": "dict"}, seed="x")
    with pytest.raises(ValueError, match=r"^initial_model: module class path 'nowhere.Net' does not import: "):
        initial_model({"path": "nowhere.Net", "config_type": "dict"})


TEMPLATE = REPO / "job_templates" / "lightning_mlflow_fedavg"
TEMPLATE_VARIABLES = {"server": {"module_path"}, "client": {"module_path", "datamodule_path"}}


def test_job_template_has_the_files_nvflare_job_create_needs():
    for name in ("info.conf", "info.md", "meta.conf", "config_fed_server.conf", "config_fed_client.conf"):
        assert (TEMPLATE / name).is_file(), name


@pytest.mark.parametrize("side", ["server", "client"])
def test_job_template_configures_exactly_what_the_job_does(side):
    # The template is the job's config with comments for `nvflare job create` users; this keeps them one.
    from pyhocon import ConfigFactory

    from flctl.check_job import resolve, variables

    template = json.loads(json.dumps(ConfigFactory.parse_file(str(TEMPLATE / f"config_fed_{side}.conf"))))
    job = json.loads((JOB / "app" / "config" / f"config_fed_{side}.json").read_text())
    # The template names the module and the DataModule by variables (nvflare job create fills them
    # in); the job writes them out. Resolved, they are one.
    for name in TEMPLATE_VARIABLES[side]:
        assert template[name].startswith("cifar10_example."), name
    resolved = resolve(template, variables(template))
    assert {k: v for k, v in resolved.items() if k not in TEMPLATE_VARIABLES[side]} == resolve(job, variables(job))
    assert not TEMPLATE_VARIABLES[side] & set(job)


def test_installable_packages_are_found_not_listed():
    # `pip install .` (the pre-installed deployment style) finds every package under custom/.
    import setuptools
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py-modules" not in config and set(config["packages"]) == {"find"}
    found = setuptools.find_packages(str(REPO / "custom"))
    assert {"fl_lightning_mlflow", "fl_lightning_mlflow.site", "fl_lightning_mlflow.server", "flctl"} <= set(found)
