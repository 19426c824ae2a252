"""The FedOpt job in the simulator: the server's optimizer (FLARE's PTFedOptModelShareableGenerator:
SGD with momentum on the aggregated update) runs with our sites and tracker, and the parent run
records the algorithm and its hyperparameters."""

import pytest
import torch

from conftest import REPO, tracked_runs
from fl_lightning_mlflow.server.server_state import load_state
from flctl.simulate import simulate

pytestmark = pytest.mark.slow


def test_fedopt_runs_and_the_parent_run_records_the_algorithm(offline_data, tmp_path):
    run = simulate(
        REPO / "jobs" / "hello-lightning-fedopt",
        tmp_path,
        offline_data,
        sites=2,
        rounds=2,
        extra_settings={"server.server_lr": 0.8},
        prepare=False,
        evaluate=False,
        say=lambda msg: None,
        show=None,
        timeout=600,
    )
    assert run.outcome.ok, run.outcome.problems
    _, (parent,), children = tracked_runs(run.server_dir, "hello-lightning-fedopt")
    params = parent.data.params
    assert params["algorithm"] == "FedOpt" and params["server_optimizer"] == "torch.optim.SGD"
    assert params["server_lr"] == "0.8" and params["server_momentum"] == "0.6"
    assert set(children) == {"site-1", "site-2"} and parent.info.status == "FINISHED"
    model = torch.load(run.outcome.model, weights_only=False)
    assert model  # the global model the server's optimizer produced was persisted
    # ...and beside it the server optimizer's state of the last round (a resume starts from it).
    state = load_state(run.server_dir / "app_server" / "fedopt_server_state.pt", "fedopt", 1)
    assert state["optimizer"]["state"] and state["model"].keys() == model["model"].keys()
