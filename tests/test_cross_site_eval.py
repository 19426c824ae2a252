"""What cross-site evaluation covers (server.cross_site_eval): the workflow's setting, what the
parent run's cross-site table records, and one short simulator run with the global models only,
on fewer simulator threads than sites (each site's worker kept between its turns)."""

import json
from pathlib import Path

import pytest
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fl_lightning_mlflow.common.protocol import CROSS_SITE_MODELS_TAG, STATS_FILE
from fl_lightning_mlflow.server.cross_site_eval import CROSS_SITE_MODELS, CrossSiteEval, check_models
from fl_lightning_mlflow.server.summary import FederationSummary
from flctl.configure import configure_job

REPO = Path(__file__).resolve().parents[1]


def test_all_is_flare_own_workflow_global_asks_no_site_for_its_model_none_evaluates_nothing():
    every = CrossSiteEval(models="all", model_locator_id="model_locator")
    assert every._submit_model_task_name == AppConstants.TASK_SUBMIT_MODEL
    assert every._model_locator_id == "model_locator"
    only_global = CrossSiteEval(models="global", model_locator_id="model_locator")
    assert only_global._submit_model_task_name == "" and only_global._model_locator_id == "model_locator"
    nothing = CrossSiteEval(models="none", model_locator_id="model_locator")
    assert nothing._submit_model_task_name == "" and nothing._model_locator_id == ""
    # The default is today's: everything.
    assert CrossSiteEval().models == "all"


@pytest.mark.parametrize("bad", ["", "globals", "ALL", None, 2, ["global"]])
def test_a_bad_setting_is_one_line_naming_the_variable(bad):
    with pytest.raises(ValueError) as e:
        CrossSiteEval(models=bad)
    line = str(e.value)
    assert "\n" not in line and "cross_site_models" in line and repr(bad) in line
    assert all(choice in line for choice in CROSS_SITE_MODELS)


def test_the_setting_is_checked_as_it_is_given():
    assert [check_models(m) for m in CROSS_SITE_MODELS] == list(CROSS_SITE_MODELS)


def test_none_ends_the_workflow_at_once():
    # No engine, no clients: "none" must not reach FLARE's control flow, which would need both.
    CrossSiteEval(models="none").control_flow(Signal(), FLContext())


def test_the_table_says_what_was_evaluated_when_the_workflow_said_it():
    summary = FederationSummary()
    summary.add_cross_site("SRV_FL_global_model.pt", "site-1", {"val_acc": 0.5})
    summary.add_cross_site("SRV_FL_global_model.pt", "site-2", None)
    _, rows = summary.cross_site()
    assert all("evaluated" not in row for row in rows)  # FLARE's own CrossSiteModelEval says nothing
    summary.cross_site_models = "global"
    _, rows = summary.cross_site()
    assert [row["evaluated"] for row in rows] == ["global", "global"]
    assert rows[1]["metric"] == "error"


def test_every_job_offers_the_setting_with_today_s_default():
    configs = sorted(REPO.glob("jobs/*/app/config/config_fed_server.json"))
    assert configs
    for path in configs:
        config = json.loads(path.read_text())
        assert config["cross_site_models"] == "all", path
        (workflow,) = [w for w in config["workflows"] if w["id"] == "cross_site_model_eval"]
        assert workflow["path"] == "fl_lightning_mlflow.server.cross_site_eval.CrossSiteEval", path
        assert workflow["args"]["models"] == "{cross_site_models}", path


def test_flctl_check_names_a_bad_setting(tmp_path):
    from flctl.check_job import check_job

    settings = {"server.cross_site_models": "some"}
    job = configure_job(REPO / "jobs" / "hello-lightning-mlflow", tmp_path / "job", settings)
    problems, _ = check_job(job, 2, None, check_data=False)
    named = [p for p in problems if "cross_site_models" in p]
    assert len(named) == 1 and "'some'" in named[0] and "\n" not in named[0], problems


@pytest.fixture(scope="module")
def global_only_run(offline_data, template_job, tmp_path_factory):
    """2 sites, 1 round, the global models only, on 1 simulator thread: the setting for many sites
    on few threads, where flctl keeps each site's worker between its turns (flctl.warm_sites)."""
    from flctl.simulate import simulate

    return simulate(
        template_job, tmp_path_factory.mktemp("global-only"), offline_data, sites=2, rounds=1, epochs=1, threads=1,
        extra_settings={"server.cross_site_models": "global", "client.system_metrics_seconds": 0},
        prepare=False, evaluate=False, say=lambda msg: None, show=None, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_global_only_evaluates_the_global_models_and_the_parent_run_says_so(global_only_run):
    import mlflow

    from conftest import tracked_runs

    run = global_only_run
    assert run.outcome.ok, (run.outcome.problems, run.log[-3000:])
    server = run.server_dir
    assert json.loads((server / STATS_FILE).read_text())["lost"] == {}
    client, (parent,), _ = tracked_runs(server)
    assert parent.data.tags[CROSS_SITE_MODELS_TAG] == "global"
    evaluated = {name.split("/")[1] for name in parent.data.metrics if name.startswith("cross_site/")}
    # The model locator's global models (the final one; the best too where the persistor kept one), no site's
    assert evaluated and all(name.startswith("SRV_") for name in evaluated), evaluated
    mlflow.set_tracking_uri(f"sqlite:///{server / 'mlflow.db'}")
    table = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/cross_site_validation.json")
    column = table["columns"].index("evaluated")
    assert len(table["data"]) == len(evaluated) * 2 * 2 and {row[column] for row in table["data"]} == {"global"}
    assert "submit_model" not in run.log  # no site was asked for its model


@pytest.mark.slow
def test_with_fewer_threads_than_sites_each_site_worker_serves_all_its_turns(global_only_run):
    """A train turn and a validate turn per global model for each site, all in one worker process,
    its data loaded once."""
    import os

    from conftest import tracked_runs

    run = global_only_run
    _, (parent,), _ = tracked_runs(run.server_dir)
    evaluated = {name.split("/")[1] for name in parent.data.metrics if name.startswith("cross_site/")}
    for site in ("site-1", "site-2"):
        log = (run.run_dir / "simulator" / site / "log.txt").read_text()
        assert log.count("ClientTaskWorker started to run") == 1, site
        assert log.count("Finished one task run") == 1 + len(evaluated), site
        assert log.count(f"{site}: 2700 train / 300 val samples") == 1, site
    assert "warm sites: 2 worker process(es) forked from one that imported torch once" in run.log
    assert run.log.count(f"{len(os.sched_getaffinity(0))} torch thread(s)") == 2  # one site at a time: all cores
