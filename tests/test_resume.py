"""Resume's parts on a real SQLite MLflow store and real job folders: reading a dead job, the
plan (site step offsets, best round so far), the continuation job's config, the refusals (one
line each), and the tracker's continuation reopening the same runs."""

import json
import shutil
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar10_example.network import CifarNet
from fl_lightning_mlflow.server.continuation import Continuation, ContinuationError
from fl_lightning_mlflow.server.mlflow_sink import PARENT, MLflowSink
from fl_lightning_mlflow.server.model_logger import ModelLogger
from fl_lightning_mlflow.server.model_selector import KeyMetricSelector
from fl_lightning_mlflow.server.resume_plan import (
    RESUME_BEST_MODEL,
    RESUME_MODEL,
    ResumeRefused,
    best_so_far,
    dead_job,
    make_plan,
)
from flctl.cli import main
from flctl.configure import configure_job
from flctl.errors import JOBS, CliError
from flctl.resume_job import prepare

SITES = ["site-1", "site-2"]
ACC = [0.30, 0.50, 0.45, 0.60]  # global_val_acc at rounds 0..3 (round 0 never counts as a best)
SPEC = {"path": "cifar10_example.network.CifarNet", "args": {}}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def dead(tmp_path, store, rounds_done=2, model=True, best=True, spec=SPEC, experiment="hello-lightning-mlflow"):
    """A job's server folder as its process left it when it died after rounds_done rounds: the
    journal (not ended), runs RUNNING in MLflow, the persisted models."""
    run_dir, db = tmp_path / "server" / "job-1", tmp_path / "mlflow.db"
    run_dir.mkdir(parents=True)
    shutil.copy(store, db)
    uri = f"sqlite:///{db}"
    sink = MLflowSink(uri, run_dir, experiment, ModelLogger(spec, "m"))
    sink.start("job", "job-1", SITES, {}, {"num_rounds": 5})
    now = int(time.time() * 1000)
    for r in range(rounds_done):
        for i, site in enumerate(SITES):
            sink.metrics(site, [("train_loss", 1.0 / (r + 1), r * 10 + s + i) for s in range(10)], now + r)
        sink.metrics(PARENT, [("global_val_acc", ACC[r])], now + r, step=r)
        sink.round_done(r)
    assert sink.queue.drain(30)
    sink.queue.close(5)  # the process is gone: its journal's lock is free, its state not ended
    app = run_dir / "app_server"
    app.mkdir()
    if model:
        torch.save({"model": CifarNet().state_dict()}, app / "FL_global_model.pt")
    if best:
        torch.save({"model": CifarNet().state_dict()}, app / "best_FL_global_model.pt")
    return run_dir, uri


def job_of(tmp_path, name="hello-lightning-mlflow", rounds=5):
    return configure_job(JOBS / name, tmp_path / "jobs" / name, {"server.num_rounds": rounds})


def server_config(job):
    return json.loads((job / "app" / "config" / "config_fed_server.json").read_text())


def component(conf, cid):
    return next(c for c in conf["components"] + conf["workflows"] if c["id"] == cid)


# ----- the dead job and the plan --------------------------------------------------------------------
def test_the_plan_continues_after_the_last_round_and_step_and_carries_the_best(tmp_path, empty_store):
    run_dir, uri = dead(tmp_path, empty_store, rounds_done=4)
    job = dead_job(run_dir, 5)
    assert job.last_round == 3 and job.best_model is not None
    plan = make_plan(job, MlflowClient(uri), "global_val_acc", "max", 5)
    assert plan["start_round"] == 4 and plan["num_rounds"] == 5
    assert plan["step_offsets"] == {"site-1": 40, "site-2": 41}  # last steps 39 and 40, plus one
    assert plan["best"] == [3, 0.60]
    assert plan["run_ids"][PARENT] and set(plan["run_ids"]) == {PARENT, *SITES}


def test_the_best_so_far_skips_round_0_keeps_the_first_of_equals_and_follows_the_mode(tmp_path, empty_store):
    run_dir, uri = dead(tmp_path, empty_store, rounds_done=4)
    client, parent = MlflowClient(uri), dead_job(run_dir).state["run_ids"][PARENT]
    assert best_so_far(client, parent, "global_val_acc", "min", 3) == [2, 0.45]  # round 0's 0.30 is never a best
    assert best_so_far(client, parent, "global_val_acc", "max", 2) == [1, 0.50]  # only rounds up to the last
    assert best_so_far(client, parent, None, "max", 3) is None


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no journal", "no tracking journal"),
        ("finished", r"finished \(its runs are FINISHED\): nothing to resume"),
        ("no round", "no round completed"),
        ("all rounds", "all 2 rounds completed"),
        ("no model", "no persisted global model"),
    ],
)
def test_nothing_to_resume_is_said_in_one_line(tmp_path, empty_store, case, expected):
    if case == "no journal":
        (tmp_path / "empty").mkdir()
        with pytest.raises(ResumeRefused, match=expected):
            dead_job(tmp_path / "empty")
        return
    run_dir, _ = dead(tmp_path, empty_store, rounds_done=0 if case == "no round" else 2, model=case != "no model")
    if case == "finished":
        (run_dir / "mlflow_tracking_stats.json").write_text(json.dumps({"status": "FINISHED"}))
    with pytest.raises(ResumeRefused, match=expected) as refused:
        dead_job(run_dir, 2 if case == "all rounds" else 5)
    assert "\n" not in str(refused.value)


# ----- the continuation job -------------------------------------------------------------------------
def test_prepare_recovers_first_and_builds_the_continuation_job(tmp_path, empty_store):
    run_dir, uri = dead(tmp_path, empty_store, rounds_done=3)
    said = []
    prepared = prepare(run_dir, job_of(tmp_path), tmp_path / "cont", say=said.append)
    assert said and said[0].startswith("recovery: job job-1")
    client = MlflowClient(uri)
    assert client.get_run(prepared.plan["run_ids"][PARENT]).info.status == "FAILED"  # recovery ended them
    conf = server_config(prepared.job)
    sag = component(conf, "scatter_and_gather")["args"]
    assert (sag["start_round"], sag["num_rounds"]) == (3, 2)  # rounds 3 and 4 of 5
    assert component(conf, "persistor")["args"]["source_ckpt_file_full_name"] == RESUME_MODEL
    assert component(conf, "model_selector")["args"]["best_value"] == 0.50
    tracker = component(conf, "mlflow_tracker")["args"]
    assert tracker["tracking_uri"] == uri and tracker["resume_from"]["start_round"] == 3
    assert tracker["fl_params"]["num_rounds"] == "{num_rounds}" and conf["num_rounds"] == 5  # the job's own total
    custom = prepared.job / "app" / "custom"
    assert (custom / RESUME_MODEL).is_file() and (custom / RESUME_BEST_MODEL).is_file()
    assert "rounds 3..4 follow" in prepared.summary()


def test_a_changed_model_class_is_refused(tmp_path, empty_store):
    run_dir, _ = dead(tmp_path, empty_store, spec={"path": "cifar10_example.lit_module.LitCifarNet", "args": {}})
    with pytest.raises(CliError, match="the model class changed .*LitCifarNet then, .*CifarNet now"):
        prepare(run_dir, job_of(tmp_path), tmp_path / "cont", say=print)


def test_a_live_job_is_left_alone(tmp_path, empty_store, monkeypatch):
    from fl_lightning_mlflow.server.journal import JOURNAL_DIR, try_lock
    from flctl import resume_job

    # The wait for a just-killed server's lock (15 s) is resume_job's; the refusal after it is tested here.
    monkeypatch.setattr(resume_job, "LOCK_WAIT_SECONDS", 0.5)
    run_dir, _ = dead(tmp_path, empty_store)

    held = try_lock(run_dir / JOURNAL_DIR)
    try:
        with pytest.raises(CliError, match="its FL server still runs"):
            prepare(run_dir, job_of(tmp_path), tmp_path / "cont", say=print)
    finally:
        held.close()


# ----- the tracker's continuation ---------------------------------------------------------------------
def test_the_continuation_reopens_the_same_runs_and_shifts_site_steps(tmp_path, empty_store):
    run_dir, uri = dead(tmp_path, empty_store, rounds_done=3)
    prepared = prepare(run_dir, job_of(tmp_path), tmp_path / "cont", say=print)
    plan = prepared.plan
    cont = Continuation(plan)
    app_dir = tmp_path / "new" / "app_server"
    shutil.copytree(prepared.job / "app" / "custom", app_dir / "custom")
    sink = MLflowSink(uri, tmp_path / "new", "hello-lightning-mlflow", ModelLogger(SPEC, "m"), resume=cont.sink_state())
    sink.start("job", "job-2", ["site-1", "site-3"], {}, {})  # site-2 did not come back; site-3 is new
    from fl_lightning_mlflow.server.summary import FederationSummary

    summary = FederationSummary()
    gone = cont.start(sink, summary, app_dir, "job-2", ["site-1", "site-3"])
    assert gone == ["site-2"] and summary.best == (1, 0.50) and summary.rounds_done == 3
    assert (app_dir / "best_FL_global_model.pt").is_file()
    sink.metrics("site-1", cont.shift("site-1", [("train_loss", 0.1, 0), ("train_loss", 0.09, 1)]), 10**13)
    assert sink.queue.drain(30)
    sink.queue.close(5)
    client, ids = MlflowClient(uri), plan["run_ids"]
    parent, site1, site2 = (client.get_run(ids[k]) for k in (PARENT, "site-1", "site-2"))
    assert parent.info.status == site1.info.status == "RUNNING" and site2.info.status == "FAILED"
    assert parent.data.tags["continued_by_job"] == "job-2" and parent.data.tags["resumes_job"] == "job-1"
    assert "failure_reason" not in parent.data.tags and "after round 2" in parent.data.tags["interrupted"]
    steps = [m.step for m in client.get_metric_history(ids["site-1"], "train_loss")]
    assert steps[-2:] == [30, 31] and len(steps) == len(set(steps))
    runs = client.search_runs([plan["experiment_id"]])
    assert len([r for r in runs if r.data.tags.get("role") == "federation"]) == 1
    assert {r.data.tags.get("site") for r in runs if r.data.tags.get("role") == "site"} == {*SITES, "site-3"}


def test_a_plan_that_flctl_did_not_write_is_refused_in_one_line():
    with pytest.raises(ContinuationError, match="missing .*run_ids"):
        Continuation({"job_uid": "x"})


def test_the_selector_starts_from_the_carried_best_in_its_own_direction():
    assert KeyMetricSelector("global_val_acc", "max", best_value=0.6).best_val_metric == 0.6
    assert KeyMetricSelector("global_val_loss", "min", best_value=0.4).best_val_metric == -0.4
    with pytest.raises(ValueError, match="best_value must be a number"):
        KeyMetricSelector("global_val_acc", "max", best_value="0.6")


def test_flctl_simulate_resume_of_a_folder_that_is_no_run_says_so(tmp_path, capsys):
    assert main(["simulate", "--resume", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("flctl simulate: ") and "is not a run folder of flctl simulate" in err
    assert "\n" not in err


def test_flctl_resume_without_a_kit_writes_the_continuation_and_says_how_to_submit_it(tmp_path, empty_store, capsys):
    run_dir, _ = dead(tmp_path, empty_store, rounds_done=3)
    job = job_of(tmp_path)
    assert main(["resume", str(run_dir), "--job", str(job), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("recovery: job job-1")
    assert out[1].startswith("resume: job job-1 stopped after round 2; rounds 3..4 follow from its last global model")
    assert out[-1] == f"resume: submit it with: nvflare job submit -j {tmp_path / 'out' / job.name} --startup-kit KIT"
    assert json.loads((tmp_path / "out" / "resume_plan.json").read_text())["start_round"] == 3


def test_flctl_resume_of_a_finished_job_refuses_in_one_line(tmp_path, empty_store, capsys):
    run_dir, _ = dead(tmp_path, empty_store)
    (run_dir / "mlflow_tracking_stats.json").write_text(json.dumps({"status": "FINISHED"}))
    assert main(["resume", str(run_dir), "--job", str(job_of(tmp_path))]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "flctl resume: job job-1 finished (its runs are FINISHED): nothing to resume"
    assert main(["resume", str(run_dir), "--job", str(tmp_path)]) == 1
    assert "is not a job folder" in capsys.readouterr().err


def test_a_journal_held_by_a_live_process_is_refused_after_a_wait_naming_its_holder(tmp_path, monkeypatch):
    import os

    from fl_lightning_mlflow.server.journal import JOURNAL_DIR, save_state, try_lock
    from flctl import resume_job

    journal = tmp_path / "job" / JOURNAL_DIR
    journal.mkdir(parents=True)
    save_state(journal, {"job_uid": "u1", "tracking_uri": "sqlite:////nowhere.db", "ended": False})
    held = try_lock(journal)  # this process plays the FL server that still runs
    monkeypatch.setattr(resume_job, "LOCK_WAIT_SECONDS", 0.6)
    assert resume_job.lock_holders(journal / "lock").startswith(f": PID {os.getpid()} (")
    assert resume_job.lock_holders(tmp_path / "nobody-holds-this") == ""
    with pytest.raises(CliError, match=rf"its FL server still runs \(it holds the journal: PID {os.getpid()} "):
        resume_job.recover_first(tmp_path / "job", None, say=print)
    held.close()
