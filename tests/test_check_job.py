"""flctl check: bad configuration and bad data, refused offline with one clear line each."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cifar10_example.data import batches_dir, split_path
from conftest import JOB, REPO
from flctl.check_job import check_job
from flctl.configure import configure_job

SERVER = "app/config/config_fed_server.json"
CLIENT = "app/config/config_fed_client.json"


def job_copy(tmp_path, offline_data, **settings):
    settings = {"client.data_root": str(offline_data), **settings}
    return configure_job(JOB, tmp_path / "job", settings)


def edit(job, rel, change):
    path = job / rel
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config, indent=2))


def client_components(config):
    """(where, spec) of the client's executors and components, as the checker names them."""
    for i, entry in enumerate(config.get("executors", [])):
        yield f"executors[{i}].executor", entry["executor"]
    for i, spec in enumerate(config.get("components", [])):
        yield f"components[{i}]", spec


def trainer(config):
    """The component that takes the training arguments: the executor, or a training engine."""
    return next(spec for _, spec in client_components(config) if "local_epochs" in spec.get("args", {}))


def datamodule_args(config):
    return trainer(config)["args"]["datamodule"]["args"]


def executor_args(config):
    return trainer(config)["args"]


def trainer_class(job=JOB) -> str:
    return trainer(json.loads((job / CLIENT).read_text()))["path"].rpartition(".")[2]


def count_components(job) -> int:
    total = 0
    for rel in (SERVER, CLIENT):
        config = json.loads((job / rel).read_text())
        total += len(config.get("workflows", [])) + len(config.get("components", [])) + len(config.get("executors", []))
    return total


def component(config, cid):
    return next(c for c in config["components"] + config.get("workflows", []) if c["id"] == cid)


def one_problem(job, sites=2, data_root=None) -> str:
    problems, _ = check_job(job, sites, data_root)
    assert len(problems) == 1, problems
    assert "\n" not in problems[0]
    return problems[0]


@pytest.mark.slow  # every job's components built in a fresh process: about 18 s
def test_the_shipped_jobs_pass(offline_data):
    # In a fresh process, as a user runs `flctl check`; every job in one, to pay for the imports once.
    jobs = sorted(str(p) for p in (REPO / "jobs").iterdir() if (p / "meta.json").is_file())
    assert len(jobs) >= 3
    code = "import sys; from flctl.cli import main; "
    code += "sys.exit(max(main(['check', j, *sys.argv[1:3]]) for j in sys.argv[3:]))"
    result = subprocess.run(
        [shutil.which("python"), "-c", code, "--sites=2", f"--data-root={offline_data}", *jobs],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    for job, line in zip(jobs, lines, strict=True):
        assert line.endswith(f"is fine ({count_components(Path(job))} components, data for 2 site(s))"), line


def test_a_nested_config_type_dict_is_passed_through_as_flare_does(tmp_path, offline_data):
    # FedOpt's optimizer_args name a class, but "config_type": "dict" tells FLARE to pass the
    # dict as it is (the generator builds the optimizer later, with the model's parameters).
    job = configure_job(
        REPO / "jobs" / "hello-lightning-fedopt", tmp_path / "job", {"client.data_root": str(offline_data)}
    )
    assert check_job(job, 2, None)[0] == []
    server = json.loads((job / SERVER).read_text())
    del component(server, "shareable_generator")["args"]["optimizer_args"]["config_type"]
    (job / SERVER).write_text(json.dumps(server))
    assert one_problem(job).endswith(
        "components[3] (id 'shareable_generator').args.optimizer_args.args: SGD needs argument 'params'"
    )


def test_json_that_does_not_parse(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data)
    (job / CLIENT).write_text('{\n  "local_epochs": 1,,\n}\n')
    assert one_problem(job) == f"{job / CLIENT}:2:21: invalid JSON: Expecting property name enclosed in double quotes"


def test_a_class_path_that_does_not_import(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data)
    edit(job, CLIENT, lambda c: trainer(c).update(path="lightning_exec.LightningExecutor"))
    line = one_problem(job)
    cid = trainer(json.loads((job / CLIENT).read_text()))["id"]
    assert str(job / CLIENT) in line and f"(id {cid!r})" in line
    assert "class path 'lightning_exec.LightningExecutor' does not import: ModuleNotFoundError" in line


def test_a_mistyped_argument_gets_a_suggestion(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data)
    edit(job, CLIENT, lambda c: executor_args(c).update(local_epoch=2))
    line = one_problem(job)
    assert line.endswith(f"{trainer_class()} has no argument 'local_epoch' (did you mean 'local_epochs'?)")


def test_an_unknown_argument_of_a_flare_class(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data)
    edit(job, SERVER, lambda c: component(c, "aggregator")["args"].update(weights_by_iter=True))
    assert "InTimeAccumulateWeightedAggregator has no argument 'weights_by_iter'" in one_problem(job)


def test_a_variable_that_is_not_defined(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data)
    edit(job, CLIENT, lambda c: executor_args(c).update(lr="{learning_rate}"))
    assert "uses {learning_rate}, which is not a top-level variable of this file" in one_problem(job)


def test_a_dotted_key(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data)
    edit(job, SERVER, lambda c: component(c, "mlflow_tracker")["args"]["kw_args"].update({"mlflow.note.content": "x"}))
    assert "mlflow.note.content: dotted key" in one_problem(job)


@pytest.mark.parametrize(
    "setting,value,expected",
    [
        ("server.num_rounds", 0, "config_fed_server.json: variable num_rounds: num_rounds must be >= 1, got 0"),
        ("server.min_clients", 0, "config_fed_server.json: variable min_clients: min_clients must be >= 1, got 0"),
        ("server.train_timeout", -5, "variable train_timeout: train_timeout must be >= 0, got -5"),
        ("client.local_epochs", 0, "TRAINER: local_epochs must be an integer >= 1, got 0"),
        ("client.local_epochs", "2", "TRAINER: local_epochs must be an integer >= 1, got '2'"),
        # the user's classes refuse their own arguments, in their own words, named by the engine
        (
            "client.batch_size",
            0,
            "TRAINER: datamodule cifar10_example.data.CifarDataModule refused its arguments: "
            "ValueError: CifarDataModule: batch_size must be an integer >= 1, got 0",
        ),
        (
            "client.lr",
            -0.1,
            "component 'engine': TRAINER: module cifar10_example.lit_module.LitCifarNet refused its "
            "arguments: ValueError: lr must be > 0, got -0.1",
        ),
        (
            "client.optimizer",
            "adamm",
            "TRAINER: module cifar10_example.lit_module.LitCifarNet refused its arguments: "
            "ValueError: optimizer must be one of",
        ),
        ("meta.min_clients", 0, "meta.json: min_clients must be an integer >= 1, got 0"),
    ],
)
def test_values_out_of_range(tmp_path, offline_data, setting, value, expected):
    job = job_copy(tmp_path, offline_data, **{setting: value})
    expected = expected.replace("TRAINER", trainer_class())  # the executor, or its training engine
    assert expected in one_problem(job)


def test_min_clients_above_the_number_of_sites(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data, **{"server.min_clients": 3})
    # Used by the workflow and the guard: reported once, as the variable.
    assert one_problem(job, sites=2) == f"{job / SERVER}: variable min_clients: min_clients is 3 but only 2 site(s) run"
    job = job_copy(tmp_path, offline_data, **{"meta.min_clients": 3})
    assert one_problem(job, sites=2) == f"{job / 'meta.json'}: min_clients is 3 but only 2 site(s) will run"


def test_a_key_metric_the_sites_never_report(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data, **{"server.key_metric": "val_accuracy"})
    assert one_problem(job).endswith(
        "component 'model_selector': key_metric 'val_accuracy' is never reported by the sites "
        "(they report ['global_val_acc', 'global_val_loss'])"
    )


FEDPROX, SCAFFOLD = REPO / "jobs" / "hello-lightning-fedprox", REPO / "jobs" / "hello-lightning-scaffold"


def test_fedprox_mu_recorded_is_the_one_the_sites_train_with(tmp_path, offline_data):
    job = configure_job(FEDPROX, tmp_path / "job", {"client.data_root": str(offline_data), "client.fedprox_mu": 0.1})
    assert one_problem(job) == (
        f"{job / SERVER}: component 'mlflow_tracker': fl_params record fedprox_mu 0.01, "
        "but the sites train with fedprox_mu 0.1"
    )
    job = configure_job(FEDPROX, tmp_path / "job", {"client.fedprox_mu": 0, "server.fedprox_mu": 0})
    problems, _ = check_job(job, 2, None, check_data=False)
    assert problems == [
        f"{job / SERVER}: component 'mlflow_tracker': fl_params record algorithm FedProx, "
        "but the sites train with fedprox_mu 0 (FedAvg)"
    ]
    job = configure_job(FEDPROX, tmp_path / "job", {"client.fedprox_mu": -1, "server.fedprox_mu": -1})
    problems, _ = check_job(job, 2, None, check_data=False)
    assert len(problems) == 1 and problems[0].endswith(
        "LightningEngine refused its arguments: ValueError: LightningEngine: fedprox_mu must be a number >= 0 "
        "(0: FedAvg), got -1"
    )


def test_scaffold_needs_its_aggregator_to_expect_the_control_differences(tmp_path):
    job = configure_job(SCAFFOLD, tmp_path / "job", {})
    edit(job, SERVER, lambda c: component(c, "aggregator")["args"].update(expected_data_kind="WEIGHT_DIFF"))
    problems, _ = check_job(job, 2, None, check_data=False)
    assert problems == [
        f"{job / SERVER}: component 'aggregator': SCAFFOLD (workflow 'scatter_and_gather_scaffold') needs "
        'expected_data_kind {"_model_weights_": "WEIGHT_DIFF", "scaffold_c_diff": "WEIGHT_DIFF"}, got "WEIGHT_DIFF"'
    ]


def test_the_recorded_algorithm_is_the_one_that_runs(tmp_path):
    job = configure_job(JOB, tmp_path / "job", {})  # FedAvg's workflow, recorded as SCAFFOLD
    edit(job, SERVER, lambda c: component(c, "mlflow_tracker")["args"]["fl_params"].update(algorithm="SCAFFOLD"))
    problems, _ = check_job(job, 2, None, check_data=False)
    assert problems == [
        f"{job / SERVER}: component 'mlflow_tracker': fl_params record algorithm SCAFFOLD, "
        "but no workflow runs it (ScatterAndGatherScaffold)"
    ]
    job = configure_job(SCAFFOLD, tmp_path / "job", {})
    edit(job, SERVER, lambda c: component(c, "mlflow_tracker")["args"]["fl_params"].update(algorithm="FedAvg"))
    problems, _ = check_job(job, 2, None, check_data=False)
    assert problems == [
        f"{job / SERVER}: component 'mlflow_tracker': fl_params record algorithm 'FedAvg', "
        "but workflow 'scatter_and_gather_scaffold' runs SCAFFOLD"
    ]


@pytest.mark.parametrize(
    "uri,expected",
    [
        ("file:///tmp/mlruns", "MLflow >= 3.13 refuses file stores"),
        ("mlflow.example.com:5000", "unsupported scheme 'mlflow.example.com'"),
        ("/tmp/mlflow.db", "MLflow >= 3.13 refuses file stores"),
    ],
)
def test_an_unparseable_tracking_uri(tmp_path, offline_data, uri, expected):
    job = job_copy(tmp_path, offline_data, **{"server.tracking_uri": uri})
    line = one_problem(job)
    assert "(id 'mlflow_tracker'): FederatedMLflowTracker refused its arguments" in line and expected in line


def test_a_yaml_file_under_app_custom(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data)
    (job / "app/custom/settings.yml").write_text("a: 1\n")
    assert "a YAML file under app/custom breaks `nvflare job submit`" in one_problem(job)


def test_missing_data_folder(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data)
    missing = tmp_path / "no-data"
    assert one_problem(job, data_root=str(missing)) == f"site site-1: missing data folder: {missing}"


def test_missing_split_for_a_site(tmp_path, offline_data):
    data = shutil.copytree(offline_data, tmp_path / "data")
    split_path(data, "site-2").unlink()
    job = job_copy(tmp_path, data)
    assert one_problem(job).startswith("site site-2: missing split file (run scripts/prepare_data.sh with enough")


def test_a_truncated_data_file(tmp_path, offline_data):
    data = shutil.copytree(offline_data, tmp_path / "data")
    batch = batches_dir(data) / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:500])
    job = job_copy(tmp_path, data)
    problems, _ = check_job(job, 2, None)
    # Every site reads the same files: each says so, naming itself and the file.
    assert [p.split(":")[0] for p in problems] == ["site site-1", "site site-2"]
    assert all("unreadable data file" in p and str(batch) in p for p in problems)


def test_the_command_line_prints_one_line_per_problem_and_fails(tmp_path, offline_data, capsys):
    # `flctl check` as the command line runs it (in this process; test_the_shipped_jobs_pass runs a fresh one).
    from flctl.cli import main

    job = job_copy(tmp_path, offline_data, **{"client.local_epochs": 0})
    assert main(["check", str(job), "--sites", "2"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    where, spec = next(
        (w, c) for w, c in client_components(json.loads((job / CLIENT).read_text())) if "local_epochs" in c["args"]
    )
    assert line.startswith(f"flctl check: {job / CLIENT}: {where} (id {spec['id']!r})")
    assert "local_epochs must be an integer >= 1, got 0" in line


@pytest.mark.slow
def test_run_simulator_refuses_a_bad_job_before_starting_anything(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data)
    edit(job, CLIENT, lambda c: datamodule_args(c).update(batchsize=64))
    result = subprocess.run(
        ["bash", str(REPO / "scripts/run_simulator.sh"), "--job", str(job), "--offline"]
        + ["--data-root", str(offline_data), "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    problem, verdict = result.stderr.strip().splitlines()[-2:]
    assert problem.endswith("CifarDataModule has no argument 'batchsize' (did you mean 'batch_size'?)")
    assert verdict.startswith("flctl simulate: the job has the problem(s) above; nothing was started")
    assert "running: nvflare simulator" not in result.stdout
    assert not list((tmp_path / "ws").glob("runs/*/simulator"))


def test_a_password_in_the_tracking_uri_is_not_printed(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data, **{"server.tracking_uri": "ftp://admin:s3cret@mlflow.example.com"})
    line = one_problem(job)
    assert "unsupported scheme 'ftp'" in line and "ftp://***@mlflow.example.com" in line and "s3cret" not in line


@pytest.mark.parametrize(
    "setting,value,component,expected",
    [
        ("server.log_models", "every_k:0", "(id 'mlflow_tracker'): FederatedMLflowTracker refused its arguments",
         "log_models must be 'best_and_final', 'every_round' or 'every_k:<k>' (k an integer >= 1), got 'every_k:0'"),
        ("client.system_metrics_seconds", -5, "(id 'executor'): SiteExecutor refused its arguments",
         "SiteExecutor: system_metrics_seconds must be a number of seconds in 0..3600 (0 = off), got -5"),
    ],
)  # fmt: skip
def test_a_bad_model_logging_or_system_metrics_setting(tmp_path, offline_data, setting, value, component, expected):
    job = job_copy(tmp_path, offline_data, **{setting: value})
    line = one_problem(job)
    assert component in line and expected in line


def test_a_user_class_needs_no_argument_the_engine_fills_in_and_gets_a_did_you_mean():
    """build_components.check_arguments: what the engine supplies itself (a DataModule's site) is
    not required of the config; a misspelt argument gets the closest name; a missing one is named."""
    from flctl.build_components import Problems, check_arguments

    class Data:
        def __init__(self, root: str, site: str, batch_size: int = 32):
            pass

    problems = Problems()
    assert check_arguments(Data, {"root": "/d"}, "where", problems, filled=("site",)) and problems == []
    assert not check_arguments(Data, {"root": "/d", "batchsize": 8}, "where", problems, filled=("site",))
    assert problems == ["where.args: Data has no argument 'batchsize' (did you mean 'batch_size'?)"]
    problems = Problems()
    assert not check_arguments(Data, {"batch_size": 8}, "where", problems)
    assert problems == ["where.args: Data needs argument 'root'", "where.args: Data needs argument 'site'"]


def test_a_user_class_without_config_type_dict_is_one_line(tmp_path, offline_data):
    job = job_copy(tmp_path, offline_data)

    def built_by_flare(config):
        del trainer(config)["args"]["datamodule"]["config_type"]

    edit(job, CLIENT, built_by_flare)
    problems, _ = check_job(job, 2, None)
    assert any(
        line.endswith('component \'engine\': datamodule: needs "config_type": "dict" (FLARE would build it before '
                      "the site is known)") for line in problems
    ), problems  # fmt: skip
