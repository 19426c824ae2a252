import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from flctl import data_prep, processes
from flctl.processes import live_processes  # noqa: F401 - tests import it from here
from flctl.simulate import nvflare_simulator, simulate

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "hello-lightning-mlflow"

ROUNDS, SITES, EPOCHS, BATCH, LOG_EVERY = 2, 2, 1, 32, 10


def spec(path: str, **args) -> dict:
    """A user class as a job names it (fl_lightning_mlflow.common.class_spec)."""
    return {"path": path, "config_type": "dict", "args": args}


def cifar_engine(kind: str, data_root, batch_size: int = BATCH, num_workers: int = 0, lr=None, optimizer=None,
                 momentum=None, datamodule=None, **engine_args):  # fmt: skip
    """A site engine ("lightning" or "pt") on the CIFAR-10 example, configured as the jobs configure it."""
    from fl_lightning_mlflow.site.lightning_engine import LightningEngine
    from fl_lightning_mlflow.site.pt_engine import PTEngine

    optimizer_args = {k: v for k, v in (("lr", lr), ("optimizer", optimizer), ("momentum", momentum)) if v is not None}
    if datamodule is None:
        datamodule = spec("cifar10_example.data.CifarDataModule", data_root=str(data_root), batch_size=batch_size,
                          num_workers=num_workers)  # fmt: skip
    if kind == "lightning":
        module = spec("cifar10_example.lit_module.LitCifarNet", **optimizer_args)
        return LightningEngine(module=module, datamodule=datamodule, **engine_args)
    network = spec("cifar10_example.network.CifarNet")
    return PTEngine(network=network, datamodule=datamodule, **optimizer_args, **engine_args)


@pytest.fixture(scope="session")
def offline_data(tmp_path_factory) -> Path:
    """The offline dataset, split over 2 sites (IID, seed 0): what CI trains on."""
    root = tmp_path_factory.mktemp("data") / "offline-cifar10"
    data_prep.prepare(root, sites=2, offline=True, say=lambda msg: None)
    return root


@pytest.fixture(autouse=True, scope="module")
def no_process_left_behind(request, tmp_path_factory):
    """After each test module: nothing a test started may still run (a leftover would slow every
    later test on 2 cores). What is found is ended, and named in a warning in the test summary."""
    yield
    left = processes.naming(tmp_path_factory.getbasetemp())
    if left:
        processes.end(list(left), grace=3)
        names = "; ".join(f"{pid} {line[:120]}" for pid, line in sorted(left.items())[:5])
        warnings.warn(
            f"{request.module.__name__} left {len(left)} process(es) running, now ended: {names}", stacklevel=2
        )


@pytest.fixture
def one_thread():
    """torch on one thread for the test (engine tests train in the test process), restored after."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def run_simulator(job: Path, workspace: Path, sites: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`nvflare simulator` on a job folder as it is (stdout holds the whole log)."""
    return nvflare_simulator(job, workspace, sites, timeout=timeout)


def job_from_template(dest: Path, *settings: str) -> Path:
    """`nvflare job create` from job_templates/, as the README shows it; settings: "file.conf", "k=v", ..."""
    nvflare = str(Path(sys.executable).parent / "nvflare")
    cmd = [nvflare, "job", "create", "-j", str(dest), "-w", str(REPO / "job_templates" / "lightning_mlflow_fedavg")]
    cmd += ["-sd", str(JOB / "app" / "custom"), *settings]
    created = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout[-2000:] + created.stderr[-2000:]
    return dest


@pytest.fixture(scope="session")
def template_job(tmp_path_factory) -> Path:
    """The job as `nvflare job create` makes it from our template (its configs equal the job's:
    test_job_config checks it), so the shared run below exercises the template too."""
    return job_from_template(tmp_path_factory.mktemp("template") / "hello-lightning-mlflow")


@pytest.fixture(scope="session")
def finished_run(offline_data, template_job, tmp_path_factory):
    """One simulator run (2 sites, 2 rounds, offline data) of the job made from the template,
    shared by the end-to-end tests: flctl simulate's own path (configure a copy, check it, run,
    judge from the tracker's stats file)."""
    run = simulate(
        template_job,
        tmp_path_factory.mktemp("e2e"),
        offline_data,
        sites=SITES,
        rounds=ROUNDS,
        epochs=EPOCHS,
        # every round's global model as a LoggedModel, so the tests see each round's (the default
        # logs only the best and the final); system metrics every 2 s, so every site has a series
        extra_settings={
            "client.batch_size": BATCH,
            "client.log_every_n_steps": LOG_EVERY,
            "server.log_models": "every_round",
            "client.system_metrics_seconds": 2,
        },
        prepare=False,
        evaluate=False,
        say=lambda msg: None,
        show=None,
        timeout=600,
    )
    assert run.outcome.ok, (run.outcome.problems, run.log[-3000:])
    assert run.outcome.rounds_done == ROUNDS
    return run.server_dir, run.log


def tracked_runs(server, experiment_name="hello-lightning-mlflow"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{server / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "federation"]
    children = {r.data.tags.get("site"): r for r in runs if r.data.tags.get("role") == "site"}
    return client, parents, children
