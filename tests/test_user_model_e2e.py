"""A team's own LightningModule and DataModule (tests/user_job.py), by configuration alone, in the
FLARE simulator: their metric names in MLflow as logged, the champion is the round with the lowest
key metric, and it loads and predicts in a fresh process that does not have their code."""

import ast
import json
import math
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO
from fl_lightning_mlflow.common.protocol import GLOBAL_PREFIX, STATS_FILE
from flctl.check_job import check_job
from flctl.simulate import simulate
from user_job import INPUT_SHAPE, KEY_METRIC, NAME, PACKAGE, write_user_job

ROUNDS = 4


@pytest.fixture(scope="module")
def user_job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    return write_user_job(folder / "acme-job", folder / "scans"), folder


def test_their_code_imports_nothing_of_ours(user_job):
    job, _ = user_job
    for source in (job / "app" / "custom" / PACKAGE).rglob("*.py"):
        tree = ast.parse(source.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        tops = {n.split(".")[0] for n in names}
        assert tops <= {"os", "zlib", "pathlib", "torch", "pytorch_lightning"}, (source.name, tops)


def test_flctl_check_knows_their_classes_and_metric_names(user_job, tmp_path):
    job, _ = user_job
    problems, summary = check_job(job, 2, None)
    assert problems == [] and summary.endswith("data for 2 site(s)")
    # A key metric their module does not log is found by the dry validation step.
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(job, bad, symlinks=True)
    server = bad / "app/config/config_fed_server.json"
    config = json.loads(server.read_text())
    config["key_metric"] = "global_val/rmse"
    server.write_text(json.dumps(config))
    (line,) = check_job(bad, 2, None)[0]
    assert line.endswith(
        "key_metric 'global_val/rmse' is never reported by the sites (they report ['global_val/mae', 'global_val/mse'])"
    )


@pytest.fixture(scope="module")
def user_run(user_job):
    job, folder = user_job
    run = simulate(job, folder / "ws", sites=2, rounds=ROUNDS, epochs=1, say=lambda m: None, show=None, timeout=600)
    assert run.outcome.ok, (run.outcome.problems, run.log[-3000:])
    return run


@pytest.mark.slow
def test_their_metrics_arrive_as_logged_and_the_champion_is_the_lowest_round(user_run, tmp_path):
    uri = f"sqlite:///{user_run.server_dir / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("role") == "federation"]
    sites = {r.data.tags["site"]: r for r in runs if r.data.tags.get("role") == "site"}
    assert sorted(sites) == ["site-1", "site-2"]
    for run in sites.values():  # their names, slashes and all; the received global model's under global_
        assert {"train/mse", "val/mse", "val/mae", f"{GLOBAL_PREFIX}val/mse"} <= set(run.data.metrics)
        assert run.data.params["channels"] == "4" and run.data.params["samples"] == "400"
        (training,) = [i for i in run.inputs.dataset_inputs if i.tags[0].value == "training"]
        profile = json.loads(training.dataset.profile)
        assert profile["input_shape"] == list(INPUT_SHAPE) and profile["label_histogram"] == {}

    # The champion is the round whose global key metric was lowest (the selector's weighted mean).
    key = f"{GLOBAL_PREFIX}{KEY_METRIC}"
    history = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, key)}
    assert sorted(history) == list(range(ROUNDS))
    lowest = min(history, key=history.get)
    champion = client.get_model_version_by_alias(f"{NAME}-global", "champion")
    assert champion.tags["round"] == str(lowest)
    assert math.isclose(float(champion.tags["key_metric_value"]), history[lowest], rel_tol=1e-9)
    stats = json.loads((user_run.server_dir / STATS_FILE).read_text())
    assert stats["best_model"] == {"round": lowest, "key_metric": key, "value": history[lowest], "mode": "min"}
    # worst_site by the modes given: the highest value for lower-is-better metrics
    worst = client.get_metric_history(parent.info.run_id, f"{key}/worst_site")
    per_site = [client.get_metric_history(parent.info.run_id, f"{key}/{s}") for s in sites]
    assert [w.value for w in worst] == [max(p[i].value for p in per_site) for i in range(ROUNDS)]

    # flctl simulate's held-out evaluation ran their test_step.
    assert set(user_run.test_metrics) == {"test/mse"} and user_run.n_test == 200


@pytest.mark.slow
def test_the_champion_loads_and_predicts_in_a_fresh_process_without_their_code(user_run, tmp_path):
    uri = f"sqlite:///{user_run.server_dir / 'mlflow.db'}"
    program = f"""
import importlib.util, json, sys
import mlflow, mlflow.pytorch, torch
assert importlib.util.find_spec({PACKAGE!r}) is None, "their code is on this process's path"
mlflow.set_tracking_uri({uri!r})
model = mlflow.pytorch.load_model("models:/{NAME}-global@champion")
info = mlflow.models.get_model_info("models:/{NAME}-global@champion")
out = model(torch.zeros(5, *{INPUT_SHAPE!r}))
print(json.dumps({{"shape": list(out.shape), "class": type(model).__module__ + "." + type(model).__name__,
                  "inputs": info.signature.inputs.to_dict() if info.signature else None}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [5, 1] and result["class"] == f"{PACKAGE}.model.ScanRegressor"
    (spec,) = result["inputs"]
    assert spec["tensor-spec"]["shape"] == [-1, *INPUT_SHAPE]  # from the sites' data shape


def test_the_job_folder_is_the_public_contract_only(user_job):
    """Nothing in the package was edited for it: the job's own folder holds their code and configs."""
    job, _ = user_job
    shipped = sorted(p.name for p in (job / "app" / "custom").iterdir())
    assert shipped == sorted(["fl_lightning_mlflow", PACKAGE])
    assert not (REPO / "custom" / PACKAGE).exists()
