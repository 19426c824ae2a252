"""The algorithm state a resume carries besides the global model, on real files, torch models and
FLARE's own classes: the server's state files (SCAFFOLD's global controls, FedOpt's server model
and optimizer) written atomically and read back or refused in one line, the sites' SCAFFOLD
controls kept per lineage and round, and the continuation job that carries both."""

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar10_example.network import CifarNet
from fl_lightning_mlflow.server.fedopt_generator import ResumableFedOpt
from fl_lightning_mlflow.server.resume_plan import dead_job
from fl_lightning_mlflow.server.scaffold_workflow import ResumableScaffold
from fl_lightning_mlflow.server.server_state import ServerStateError, load_state, save_state, state_path
from fl_lightning_mlflow.site.algorithms import ScaffoldSite
from fl_lightning_mlflow.site.scaffold_store import KEEP_ROUNDS, ScaffoldStore
from fl_lightning_mlflow.site.task_forms import GlobalControls
from flctl.errors import CliError
from flctl.resume_job import prepare
from test_resume import PARENT, component, dead, empty_store, job_of, server_config  # noqa: F401 - a fixture


def zero_controls() -> dict:
    return {k: np.zeros_like(v.numpy()) for k, v in CifarNet().state_dict().items()}


# ----- the server's state files -------------------------------------------------------------------
def test_a_state_file_is_written_whole_and_read_back_with_its_round(tmp_path):
    path = tmp_path / "s.pt"
    save_state(path, "scaffold", 2, {"controls": {"w": torch.ones(2)}, "lineage": "abc"})
    save_state(path, "scaffold", 3, {"controls": {"w": torch.full((2,), 3.0)}, "lineage": "abc"})  # replaces it
    state = load_state(path, "scaffold", 3)
    assert state["round"] == 3 and torch.equal(state["controls"]["w"], torch.full((2,), 3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]  # no temp file left behind


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", r"s\.pt: no scaffold server state file \(the job persisted none\)$"),
        ("garbage", r"s\.pt: not a readable server state file \(\w+\)$"),
        ("truncated", r"s\.pt: not a readable server state file \(\w+\)$"),
        ("other kind", r"s\.pt: not a scaffold server state \(found 'fedopt'\)$"),
        ("other round", r"s\.pt: the scaffold server state is of round 1, the global model of round 2$"),
    ],
)
def test_a_bad_state_file_is_refused_in_one_line_naming_it(tmp_path, case, expected):
    path = tmp_path / "s.pt"
    if case == "garbage":
        path.write_bytes(b"not a torch file")
    elif case == "truncated":
        save_state(path, "scaffold", 2, {"controls": {"w": torch.ones(1000)}})
        path.write_bytes(path.read_bytes()[:300])
    elif case != "missing":
        save_state(path, "fedopt" if case == "other kind" else "scaffold", 1, {})
    with pytest.raises(ServerStateError, match=expected) as refused:
        load_state(path, "scaffold", 2)
    assert "\n" not in str(refused.value)


def test_the_scaffold_workflow_restores_its_global_controls_and_lineage(tmp_path):
    saved = {k: torch.full_like(torch.as_tensor(v), 0.5) for k, v in zero_controls().items()}
    save_state(tmp_path / "s.pt", "scaffold", 2, {"controls": saved, "lineage": "run-1"})
    workflow = ResumableScaffold(num_rounds=2, start_round=3, resume_state=str(tmp_path / "s.pt"))
    workflow._global_ctrl_weights = zero_controls()  # what FLARE's start_controller made: zeros
    workflow._restore(load_state(tmp_path / "s.pt", "scaffold", 2))
    assert workflow.lineage == "run-1"
    assert all(np.all(v == 0.5) and v.dtype == np.float32 for v in workflow._global_ctrl_weights.values())

    other = ResumableScaffold()
    other._global_ctrl_weights = {"features.0.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(ServerStateError, match="its controls do not fit the model"):
        other._restore(load_state(tmp_path / "s.pt", "scaffold"))


def fedopt(momentum=0.6) -> ResumableFedOpt:
    """The generator with its model and optimizer built as its START_RUN builds them."""
    gen = ResumableFedOpt(optimizer_args={"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": momentum}})
    gen.model = CifarNet(init_seed=1)
    gen.optimizer = torch.optim.SGD(gen.model.parameters(), lr=1.0, momentum=momentum)
    gen.device = torch.device("cpu")
    return gen


def server_step(gen: ResumableFedOpt, seed: int) -> dict:
    diff = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(seed)).numpy() * 0.01
            for k, v in gen.model.named_parameters()}  # fmt: skip
    weights, _ = gen.server_update(diff)
    return {k: v.detach().clone() for k, v in weights.items()}


def test_fedopt_resumed_from_its_state_steps_exactly_as_if_never_stopped(tmp_path):
    uninterrupted, first = fedopt(), fedopt()
    for r in range(3):
        server_step(uninterrupted, r)
        server_step(first, r)
    expected = [server_step(uninterrupted, r) for r in (3, 4)]
    save_state(tmp_path / "f.pt", "fedopt", 2, first.server_state())
    resumed = fedopt()  # a new server process: initial model, zero momentum
    resumed.resume_round = 2
    resumed.load_server_state(tmp_path / "f.pt")
    for want, r in zip(expected, (3, 4), strict=True):
        got = server_step(resumed, r)
        assert all(torch.equal(want[k], got[k]) for k in want)
    blank = fedopt()  # the global model alone, without the momentum, is not the same step
    blank.model.load_state_dict(first.model.state_dict())
    assert not torch.equal(server_step(blank, 3)["classifier.3.weight"], expected[0]["classifier.3.weight"])


def test_a_fedopt_state_that_does_not_fit_is_refused_in_one_line(tmp_path):
    save_state(tmp_path / "f.pt", "fedopt", 2, {"model": {"x": torch.ones(1)}, "optimizer": {}})
    gen = fedopt()
    gen.resume_round = 2
    with pytest.raises(ServerStateError, match=r"f\.pt: does not fit the job's model or optimizer: .*") as refused:
        gen.load_server_state(tmp_path / "f.pt")
    assert "\n" not in str(refused.value)


# ----- the sites' SCAFFOLD controls ---------------------------------------------------------------
def test_the_site_store_keeps_the_last_rounds_and_says_why_when_it_has_none(tmp_path):
    store = ScaffoldStore(tmp_path, "lineage-1")
    for r in range(4):
        store.save(r, {"w": torch.full((2,), float(r))})
    assert sorted(torch.load(store.path, weights_only=True)) == list(range(4 - KEEP_ROUNDS, 4))
    controls, why = store.load(2)
    assert why is None and torch.equal(controls["w"], torch.full((2,), 2.0))
    assert store.load(0) == (None, f"{store.path}: no controls of round 0")
    store.path.write_bytes(b"junk")
    controls, why = store.load(3)
    assert controls is None and why.startswith(f"{store.path}: unreadable (")
    with pytest.raises(ValueError, match=r"lineage '\.\./x' is not a plain id"):
        ScaffoldStore(tmp_path, "../x")


def train_round(site: ScaffoldSite, net, c) -> dict:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8)
    site.start(net, c)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        site.step_lr(optimizer)
        optimizer.step()
        site.corrected(net)
    return site.finish(net)


def test_a_restarted_site_takes_the_controls_of_the_round_before_the_one_it_is_given(tmp_path, caplog):
    c = {k: np.full_like(v, 0.01) for k, v in zero_controls().items()}
    site, net = ScaffoldSite(tmp_path / "job1" / "app", tmp_path), CifarNet(init_seed=3)
    kept = {}
    for r in range(3):  # rounds 0..2; the server dies after the site sent round 2
        train_round(site, net, GlobalControls(c, "lin", r))
        kept[r] = {k: v.clone() for k, v in site.helper.c_local.state_dict().items()}
    # The continuation trains round 2 again: a new process, a new job folder, the same workspace.
    resumed = ScaffoldSite(tmp_path / "job2" / "app", tmp_path)
    resumed.start(CifarNet(), GlobalControls(c, "lin", 2))
    assert all(torch.equal(resumed.helper.c_local.state_dict()[k], v) for k, v in kept[1].items())
    # Another lineage (another job) starts from zero controls, and says why in the site's log.
    fresh = ScaffoldSite(tmp_path / "job3" / "app", tmp_path)
    fresh.start(CifarNet(), GlobalControls(c, "other", 2))
    assert all(v.abs().sum() == 0 for v in fresh.helper.c_local.state_dict().values())
    assert "SCAFFOLD round 2: " in caplog.text and "other.pt: no controls of round 1" in caplog.text


# ----- the continuation job -----------------------------------------------------------------------
def test_a_scaffold_continuation_carries_the_servers_controls(tmp_path, empty_store):  # noqa: F811
    run_dir, _ = dead(tmp_path, empty_store, rounds_done=3, experiment="hello-lightning-scaffold")
    save_state(state_path(run_dir / "app_server", "scaffold"), "scaffold", 2, {"controls": {}, "lineage": "l"})
    prepared = prepare(run_dir, job_of(tmp_path, "hello-lightning-scaffold"), tmp_path / "cont", say=print)
    workflow = component(server_config(prepared.job), "scatter_and_gather_scaffold")["args"]
    assert workflow["resume_state"] == "resume_scaffold_server_state.pt" and workflow["start_round"] == 3
    assert load_state(prepared.job / "app" / "custom" / workflow["resume_state"], "scaffold", 2)["lineage"] == "l"


def test_a_fedopt_continuation_carries_the_server_optimizer(tmp_path, empty_store):  # noqa: F811
    run_dir, _ = dead(tmp_path, empty_store, rounds_done=2, experiment="hello-lightning-fedopt")
    save_state(state_path(run_dir / "app_server", "fedopt"), "fedopt", 1, fedopt().server_state())
    prepared = prepare(run_dir, job_of(tmp_path, "hello-lightning-fedopt"), tmp_path / "cont", say=print)
    generator = component(server_config(prepared.job), "shareable_generator")["args"]
    assert (generator["resume_state"], generator["resume_round"]) == ("resume_fedopt_server_state.pt", 1)
    assert (prepared.job / "app" / "custom" / generator["resume_state"]).is_file()


@pytest.mark.parametrize(
    "name, state, expected",
    [
        ("hello-lightning-scaffold", None, r"cannot resume exactly: .*no scaffold server state file"),
        ("hello-lightning-fedopt", 0, r"cannot resume exactly: .*fedopt server state is of round 0, .* round 1$"),
        ("stock scaffold", None, r"ScatterAndGatherScaffold .* does not persist SCAFFOLD's server control variates"),
        ("stock fedopt", None, r"PTFedOptModelShareableGenerator .* FedOpt's server optimizer .*ResumableFedOpt does$"),
    ],
)
def test_state_that_cannot_be_carried_is_named_and_nothing_starts(tmp_path, empty_store, name, state, expected):  # noqa: F811
    run_dir, uri = dead(tmp_path, empty_store)
    job = job_of(tmp_path, name.replace("stock ", "hello-lightning-"))
    if name.startswith("stock"):  # the job as it was before our subclasses: FLARE's own classes
        path = job / "app" / "config" / "config_fed_server.json"
        text = path.read_text().replace(
            "fl_lightning_mlflow.server.scaffold_workflow.ResumableScaffold",
            "nvflare.app_common.workflows.scatter_and_gather_scaffold.ScatterAndGatherScaffold",
        )
        path.write_text(text.replace("fl_lightning_mlflow.server.fedopt_generator.ResumableFedOpt",
                                     "nvflare.app_opt.pt.fedopt.PTFedOptModelShareableGenerator"))  # fmt: skip
    if state is not None:
        save_state(state_path(run_dir / "app_server", "fedopt"), "fedopt", state, {})
    with pytest.raises(CliError, match=expected) as refused:
        prepare(run_dir, job, tmp_path / "cont", say=print)
    assert "\n" not in str(refused.value) and not (tmp_path / "cont").exists()
    assert MlflowClient(uri).get_run(dead_job(run_dir).state["run_ids"][PARENT]).info.status == "RUNNING"
