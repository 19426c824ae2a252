"""SCAFFOLD and FedOpt simulator runs of 5 rounds SIGKILLed after round 2 resume with their
algorithm state, into the same MLflow runs (global_val_acc at steps 0..4 once each, all runs
FINISHED). SCAFFOLD: the server's global controls of round 2 (persisted beside the global model)
and each site's own controls of round 2 (kept in flctl's WORKSPACE/site_state under the run's
lineage). FedOpt: the server's model and optimizer (its momentum) of round 2.

These runs are also the algorithms' end-to-end runs (FedProx's is tests/test_algorithms_e2e.py):
the parent run records the algorithm and its settings, SCAFFOLD's sites and server exchange
control variates every round, FedOpt's global model and optimizer state are persisted.

Not asserted: that round 3 of the resumed run equals round 3 of an uninterrupted run. The sites'
processes are new after the kill and seed their RNG once at setup, so their batches' order in
round 3 differs from an uninterrupted process's, which has drawn three rounds of shuffles."""

import pytest
import torch

from conftest import REPO, tracked_runs
from fl_lightning_mlflow.server.server_state import load_state
from fl_lightning_mlflow.site.scaffold_store import STORE_DIR
from flctl.sim_resume import SERVER_JOB, resume_simulation
from flctl.simulate import SITE_STATE_DIR
from test_resume_e2e import KILL_AFTER, ROUNDS, run_and_kill_after_round

pytestmark = pytest.mark.slow
FAST = {"client.batch_size": 128}  # a quarter of the steps: what is checked here is the state, not the fit


def same_runs_completed(server_dir, experiment: str, plan: dict) -> None:
    """One parent and the same site runs, all FINISHED, the global metric at every round once;
    returns the parent run."""
    client, parents, children = tracked_runs(server_dir, experiment)
    assert len(parents) == 1 and parents[0].info.run_id == plan["run_ids"]["__parent__"]
    assert set(children) == {"site-1", "site-2"}
    for r in [*parents, *children.values()]:
        assert r.info.status == "FINISHED", (r.data.tags.get("site"), r.data.tags)
    acc = client.get_metric_history(parents[0].info.run_id, "global_val_acc")
    assert sorted(m.step for m in acc) == list(range(ROUNDS))
    return parents[0]


def test_a_killed_scaffold_run_resumes_from_the_controls_of_its_last_round(offline_data, tmp_path):
    workspace = tmp_path / "ws"
    killed = run_and_kill_after_round(
        workspace, offline_data, KILL_AFTER, job=REPO / "jobs" / "hello-lightning-scaffold", settings=FAST
    )
    state = load_state(killed / SERVER_JOB / "app_server" / "scaffold_server_state.pt", "scaffold")
    assert state["round"] == KILL_AFTER and any(v.abs().sum() > 0 for v in state["controls"].values())

    run, plan, _ = resume_simulation(killed, evaluate=False, say=print, show=None, timeout=600)
    assert run.outcome.ok, (run.outcome.problems, run.log[-3000:])
    assert plan["start_round"] == KILL_AFTER + 1
    log = run.log
    assert f"SCAFFOLD global controls of round {KILL_AFTER} restored from" in log
    # Each site, a new process, took its own controls of round 2 from where the killed run's left them.
    for site in ("site-1", "site-2"):
        store = (workspace / SITE_STATE_DIR / site / STORE_DIR).resolve()
        assert f"SCAFFOLD round {KILL_AFTER + 1}: this site's controls of round {KILL_AFTER} from {store}/" in log
    assert "this site goes on from the controls it holds" not in log  # the store's warning: none went on without
    # Each site's controls: one table under the lineage the killed run began, now at the last rounds.
    for site in ("site-1", "site-2"):
        (table,) = (workspace / SITE_STATE_DIR / site / STORE_DIR).glob("*.pt")
        assert table.stem == state["lineage"]
    final = load_state(run.server_dir / "app_server" / "scaffold_server_state.pt", "scaffold", ROUNDS - 1)
    assert final["lineage"] == state["lineage"]
    # SCAFFOLD itself: every resumed round, both sites' weight and control differences aggregated.
    assert "Beginning ScatterAndGatherScaffold training phase." in log
    resumed_rounds = ROUNDS - KILL_AFTER - 1
    assert log.count("Aggregated contributions matching key 'scaffold_c_diff'.") == resumed_rounds
    assert log.count("Contribution from site-1 ACCEPTED by the aggregator") == resumed_rounds

    parent = same_runs_completed(killed / SERVER_JOB, "hello-lightning-scaffold", plan)
    params = parent.data.params
    assert params["algorithm"] == "SCAFFOLD" and params["scaffold_control_update"].startswith("option II")
    assert params["num_rounds"] == str(ROUNDS) and params["lr"] == "0.02"  # the sites' settings, promoted


def test_a_killed_fedopt_run_resumes_from_its_server_optimizer(offline_data, tmp_path):
    killed = run_and_kill_after_round(
        tmp_path / "ws",
        offline_data,
        KILL_AFTER,
        job=REPO / "jobs" / "hello-lightning-fedopt",
        settings={**FAST, "server.server_lr": 0.8},
    )
    state = load_state(killed / SERVER_JOB / "app_server" / "fedopt_server_state.pt", "fedopt", KILL_AFTER)
    assert state["optimizer"]["state"]  # SGD's momentum buffers

    run, plan, _ = resume_simulation(killed, evaluate=False, say=print, show=None, timeout=600)
    assert run.outcome.ok, (run.outcome.problems, run.log[-3000:])
    assert f"FedOpt server model and optimizer of round {KILL_AFTER} restored from" in run.log
    final = load_state(run.server_dir / "app_server" / "fedopt_server_state.pt", "fedopt", ROUNDS - 1)
    model = torch.load(run.outcome.model, weights_only=False)  # the global model the optimizer produced
    assert final["optimizer"]["state"] and final["model"].keys() == model["model"].keys()
    parent = same_runs_completed(killed / SERVER_JOB, "hello-lightning-fedopt", plan)
    params = parent.data.params  # the job's settings stay its own through the resume
    assert params["algorithm"] == "FedOpt" and params["server_optimizer"] == "torch.optim.SGD"
    assert params["server_lr"] == "0.8" and params["server_momentum"] == "0.6"
