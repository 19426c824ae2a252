"""continuation_job on its own, on server configs in job folders: what a resume reads from a job's
config_fed_server (or refuses, in one line), and the continuation folder it writes. (The whole resume
on a dead job and a real MLflow store: test_resume.py; the server state it carries: test_resume_state.py.)"""

import json
import shutil

import pytest

from conftest import REPO
from flctl.configure import FILES
from flctl.continuation_job import (
    FLARE_SELECTOR,
    KEY_SELECTOR,
    ContinuationRefused,
    ServerConfig,
    check_model_class,
    inspect_server,
    write_continuation,
)

SHIPPED = REPO / "jobs" / "hello-lightning-mlflow" / FILES["server"]
TEMPLATE = REPO / "job_templates" / "lightning_mlflow_fedavg" / "config_fed_server.conf"
PLAN = {"start_round": 3, "num_rounds": 5, "last_round": 2, "best": [1, 0.5]}


def shipped() -> dict:
    return json.loads(SHIPPED.read_text())


def item(conf: dict, cid: str) -> dict:
    return next(c for c in conf["components"] + conf["workflows"] if c["id"] == cid)


def job_with(tmp_path, conf: dict, name="job"):
    """A job folder holding conf as its server config, a file of site code and a __pycache__."""
    job = tmp_path / name
    (job / FILES["server"]).parent.mkdir(parents=True)
    (job / FILES["server"]).write_text(json.dumps(conf))
    (job / "meta.json").write_text('{"name": "job"}')
    (job / "app" / "custom" / "__pycache__").mkdir(parents=True)
    (job / "app" / "custom" / "net.py").write_text("NET = 1\n")
    return job


def refusal(tmp_path, change) -> str:
    conf = shipped()
    change(conf)
    with pytest.raises(ContinuationRefused) as refused:
        inspect_server(job_with(tmp_path, conf))
    assert "\n" not in str(refused.value)
    return str(refused.value)


def selector_config(conf: dict, selector: dict | None) -> ServerConfig:
    return ServerConfig(conf, {"args": {}}, {"args": {}}, selector, {"args": {}}, {})


def test_the_shipped_job_reads_as_its_workflow_persistor_selector_and_tracker(tmp_path):
    server = inspect_server(job_with(tmp_path, shipped()))
    assert (server.workflow["id"], server.persistor["id"], server.tracker["id"]) == (
        "scatter_and_gather",
        "persistor",
        "mlflow_tracker",
    )
    assert server.selector["id"] == "model_selector" and server.stateful == {}
    assert (server.num_rounds, server.key_metric, server.model_class) == (
        2,
        ("global_val_acc", "max"),
        "cifar10_example.network.CifarNet",
    )


def test_a_job_whose_workflow_is_not_scatter_and_gather_is_refused_naming_its_workflows(tmp_path):
    cyclic = "nvflare.app_common.workflows.cyclic_ctl.CyclicController"
    line = refusal(tmp_path, lambda c: c["workflows"].__setitem__(0, {"id": "cyclic", "path": cyclic}))
    others = f"['{cyclic}', 'fl_lightning_mlflow.server.cross_site_eval.CrossSiteEval']"
    assert line == f"only a ScatterAndGather job can resume; its workflows are {others}"
    line = refusal(tmp_path / "two", lambda c: c["workflows"].append(dict(c["workflows"][0], id="again")))
    assert line.startswith("only a ScatterAndGather job can resume; its workflows are [")


@pytest.mark.parametrize(
    "change",
    [
        lambda c: item(c, "scatter_and_gather")["args"].pop("persistor_id"),  # FLARE's default: none
        lambda c: item(c, "scatter_and_gather")["args"].update(persistor_id="no_such_component"),
        lambda c: item(c, "persistor").update(path="nvflare.app_common.persistors.pt_persistor.Other"),
    ],
    ids=["no persistor_id", "an unknown id", "another class"],
)
def test_a_workflow_without_a_pt_file_persistor_is_refused(tmp_path, change):
    line = refusal(tmp_path, change)
    assert line == "the workflow's persistor is not PTFileModelPersistor: no global model to start from"


def test_a_job_without_exactly_one_tracker_is_refused(tmp_path):
    def no_tracker(conf):
        conf["components"].remove(item(conf, "mlflow_tracker"))

    expected = "the job has no FederatedMLflowTracker: there are no runs to continue"
    assert refusal(tmp_path, no_tracker) == expected
    assert refusal(tmp_path / "two", lambda c: c["components"].append(dict(item(c, "mlflow_tracker")))) == expected


def test_a_selector_of_another_class_is_not_read_and_gets_no_best_value(tmp_path):
    conf = shipped()
    item(conf, "model_selector")["path"] = "my_site.selectors.TopK"
    job = job_with(tmp_path, conf)
    server = inspect_server(job)
    assert server.selector is None and server.key_metric == (None, "max")
    out = write_continuation(job, tmp_path / "cont", server, PLAN, job / "app" / "custom" / "net.py", None, "uri")
    written = json.loads((out / FILES["server"]).read_text())
    assert item(written, "model_selector") == {**item(shipped(), "model_selector"), "path": "my_site.selectors.TopK"}


@pytest.mark.parametrize("value", [0, -1, True, "3", 2.0, None, "{no_such_variable}"])
def test_num_rounds_that_are_not_a_number_of_rounds_are_refused_naming_the_value(value):
    server = ServerConfig({}, {"args": {"num_rounds": value}}, {}, None, {}, {})
    with pytest.raises(ContinuationRefused) as refused:
        server.num_rounds  # noqa: B018 - the property raises
    assert str(refused.value) == f"the workflow's num_rounds is not a number of rounds: {value!r}"


def test_num_rounds_written_as_a_variable_is_the_variables_value_and_a_zero_variable_is_refused():
    workflow = {"args": {"num_rounds": "{rounds}"}}
    assert ServerConfig({"rounds": 7}, workflow, {}, None, {}, {}).num_rounds == 7
    with pytest.raises(ContinuationRefused, match=r"num_rounds is not a number of rounds: 0$"):
        ServerConfig({"rounds": 0}, workflow, {}, None, {}, {}).num_rounds  # noqa: B018 - the property raises


@pytest.mark.parametrize(
    "selector, expected",
    [
        ({"path": KEY_SELECTOR, "args": {}}, (None, "max")),
        ({"path": KEY_SELECTOR, "args": {"key_metric": "{key}", "key_metric_mode": "{mode}"}}, ("val_loss", "min")),
        ({"path": FLARE_SELECTOR, "args": {}}, ("val_accuracy", "max")),  # FLARE's own defaults
        ({"path": FLARE_SELECTOR, "args": {"key_metric": "{key}", "negate_key_metric": True}}, ("val_loss", "min")),
        # a variable is read as FLARE reads it: by its value, not as a (truthy) string
        ({"path": FLARE_SELECTOR, "args": {"negate_key_metric": "{negate}"}}, ("val_accuracy", "max")),
        ({"path": FLARE_SELECTOR, "args": {"negate_key_metric": "{negate_too}"}}, ("val_accuracy", "min")),
    ],
)
def test_the_key_metric_and_its_direction_come_from_either_selector_with_variables_resolved(selector, expected):
    conf = {"key": "val_loss", "mode": "min", "negate": False, "negate_too": True}
    assert selector_config(conf, selector).key_metric == expected


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"path": "init.initial_model", "args": {"module": {"path": "pkg.Net", "config_type": "dict"}}}, "pkg.Net"),
        ({"path": "init.initial_model", "args": {"module": {"path": "{module_path}"}}}, "pkg.FromVariable"),
        ({"path": "pkg.Net", "args": {}}, "pkg.Net"),
        ({"path": "{module_path}"}, "pkg.FromVariable"),
        ("model_component_id", None),
        (None, None),
    ],
)
def test_the_model_class_is_the_initial_models_module_or_else_the_model_itself(model, expected):
    persistor = {"args": {"model": model}} if model is not None else {}
    server = ServerConfig({"module_path": "pkg.FromVariable"}, {}, persistor, None, {}, {})
    assert server.model_class == expected


def test_a_job_made_from_the_template_is_read_from_its_hocon_with_its_module_path_resolved(tmp_path):
    job = tmp_path / "job"
    (job / FILES["server"]).parent.mkdir(parents=True)
    shutil.copyfile(TEMPLATE, (job / FILES["server"]).with_suffix(".conf"))
    server = inspect_server(job)
    assert server.model_class == "cifar10_example.network.CifarNet"  # the template's "{module_path}"
    check_model_class(server, {"model_spec": {"path": "cifar10_example.network.CifarNet", "args": {}}})
    with pytest.raises(ContinuationRefused) as refused:
        check_model_class(server, {"model_spec": {"path": "pkg.OtherNet"}})
    assert str(refused.value) == (
        "the model class changed (pkg.OtherNet then, cifar10_example.network.CifarNet now): "
        "its persisted weights do not fit"
    )
    # the continuation's JSON replaces the HOCON file (FLARE would read either, and not both)
    (job / "app" / "custom").mkdir()
    model = job / "app" / "custom" / "m.pt"
    model.write_bytes(b"weights")
    out = write_continuation(job, tmp_path / "cont", server, PLAN, model, None, "uri")
    config = out / FILES["server"]
    assert config.is_file() and not config.with_suffix(".conf").exists()
    assert item(json.loads(config.read_text()), "scatter_and_gather")["args"]["start_round"] == 3


@pytest.mark.parametrize("dead_state", [{}, {"model_spec": None}, {"model_spec": {"args": {}}}])
def test_a_dead_job_that_recorded_no_model_class_is_not_refused(dead_state):
    server = ServerConfig({}, {}, {"args": {"model": {"path": "pkg.Net"}}}, None, {}, {})
    check_model_class(server, dead_state)


def test_a_job_whose_persistor_names_no_model_class_is_not_refused():
    check_model_class(ServerConfig({}, {}, {"args": {}}, None, {}, {}), {"model_spec": {"path": "pkg.Net"}})


def test_the_continuation_is_a_fresh_copy_with_the_resume_changes_and_no_pycache(tmp_path):
    from fl_lightning_mlflow.server.resume_plan import RESUME_BEST_MODEL, RESUME_MODEL

    job = job_with(tmp_path, shipped())
    model, best = tmp_path / "FL_global_model.pt", tmp_path / "best_FL_global_model.pt"
    model.write_bytes(b"last")
    best.write_bytes(b"best")
    dest = tmp_path / "cont"
    (dest / "stale").mkdir(parents=True)  # a continuation written before: replaced whole
    out = write_continuation(job, dest, inspect_server(job), PLAN, model, best, "sqlite:////db")
    assert out == dest and not (dest / "stale").exists()
    custom = dest / "app" / "custom"
    assert sorted(p.name for p in custom.iterdir()) == sorted(["net.py", RESUME_MODEL, RESUME_BEST_MODEL])
    assert (custom / RESUME_MODEL).read_bytes() == b"last" and (custom / RESUME_BEST_MODEL).read_bytes() == b"best"
    conf = json.loads((dest / FILES["server"]).read_text())
    sag = item(conf, "scatter_and_gather")["args"]
    assert (sag["start_round"], sag["num_rounds"]) == (3, 2)  # rounds 3 and 4: the job's 5 in all
    assert item(conf, "persistor")["args"]["source_ckpt_file_full_name"] == RESUME_MODEL
    assert item(conf, "model_selector")["args"]["best_value"] == 0.5
    tracker = item(conf, "mlflow_tracker")["args"]
    assert tracker["resume_from"] == PLAN and tracker["tracking_uri"] == "sqlite:////db"
    assert json.loads((job / FILES["server"]).read_text()) == shipped()  # the dead job's own folder is untouched


def test_a_plan_with_no_best_round_gives_the_selector_no_best_value_and_copies_no_best_model(tmp_path):
    from fl_lightning_mlflow.server.resume_plan import RESUME_BEST_MODEL

    job = job_with(tmp_path, shipped())
    (tmp_path / "m.pt").write_bytes(b"last")
    plan = {**PLAN, "best": None}
    out = write_continuation(job, tmp_path / "cont", inspect_server(job), plan, tmp_path / "m.pt", None, "u")
    assert "best_value" not in item(json.loads((out / FILES["server"]).read_text()), "model_selector")["args"]
    assert not (out / "app" / "custom" / RESUME_BEST_MODEL).exists()


def test_a_job_without_app_custom_gets_one_for_the_carried_model(tmp_path):
    from fl_lightning_mlflow.server.resume_plan import RESUME_MODEL

    job = job_with(tmp_path, shipped())
    shutil.rmtree(job / "app" / "custom")
    (tmp_path / "m.pt").write_bytes(b"last")
    out = write_continuation(job, tmp_path / "cont", inspect_server(job), PLAN, tmp_path / "m.pt", None, "u")
    assert [p.name for p in (out / "app" / "custom").iterdir()] == [RESUME_MODEL]


def test_flares_own_selector_is_swapped_for_ours_with_its_settings_and_the_carried_best(tmp_path):
    from fl_lightning_mlflow.server.model_selector import KeyMetricSelector

    conf = shipped()
    conf["negate"] = True
    item(conf, "model_selector").update(
        path=FLARE_SELECTOR,
        args={"key_metric": "{key_metric}", "negate_key_metric": "{negate}", "weigh_by_local_iter": True,
              "aggregation_weights": {"site-1": 2.0}, "validation_metric_name": "ignored"},
    )  # fmt: skip
    job = job_with(tmp_path, conf)
    (tmp_path / "m.pt").write_bytes(b"last")
    plan = {**PLAN, "best": [2, 0.25]}
    out = write_continuation(job, tmp_path / "cont", inspect_server(job), plan, tmp_path / "m.pt", None, "u")
    selector = item(json.loads((out / FILES["server"]).read_text()), "model_selector")
    assert selector == {
        "id": "model_selector",
        "path": KEY_SELECTOR,
        "args": {"weigh_by_local_iter": True, "aggregation_weights": {"site-1": 2.0}, "key_metric": "global_val_acc",
                 "key_metric_mode": "min", "best_value": 0.25},
    }  # fmt: skip
    assert KeyMetricSelector(**selector["args"]).best_val_metric == -0.25  # ours takes what it is given
