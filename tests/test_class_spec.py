"""A user's class named in a config (common.class_spec), and the key metric's direction
(server.model_selector): built late, refused in one line."""

import pytest
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector

from fl_lightning_mlflow.common.class_spec import SpecError, build, check_spec, is_spec, path_of, takes
from fl_lightning_mlflow.server.model_selector import KeyMetricSelector, mode_of

DATAMODULE = "cifar10_example.data.CifarDataModule"


def spec(path, **args):
    return {"path": path, "config_type": "dict", "args": args}


def test_a_spec_is_built_with_its_args_and_the_site_filled_in_when_the_constructor_takes_it(tmp_path):
    dm = build(spec(DATAMODULE, data_root=str(tmp_path), batch_size=8), "Engine", "datamodule", fill={"site": "site-3"})
    assert type(dm).__name__ == "CifarDataModule" and dm.site == "site-3" and dm.batch_size == 8
    # An explicit value wins over the filled-in one; a constructor without the argument does not get it.
    dm = build(spec(DATAMODULE, data_root="x", site="mine"), "Engine", "datamodule", fill={"site": "site-3"})
    assert dm.site == "mine"
    net = build(spec("cifar10_example.network.CifarNet"), "Engine", "network", fill={"site": "site-3"})
    assert type(net).__name__ == "CifarNet"
    assert takes(type(dm), "site") and not takes(type(net), "site")


def test_an_object_flare_built_already_is_taken_as_it_is():
    obj = object()
    assert build(obj, "Engine", "module") is obj and not is_spec(obj)
    assert path_of(obj) == "builtins.object" and path_of(spec("a.b.C")) == "a.b.C"
    check_spec(obj, "Engine", "module")  # no complaint: built


@pytest.mark.parametrize(
    "value,message",
    [
        (None, 'Engine: module must be {"path": "pkg.mod.Class", "config_type": "dict", "args": {...}}, got '),
        ("pkg.Model", 'Engine: module must be {"path": '),
        ({"args": {}}, 'Engine: module must be {"path": '),
        ({"path": "Model"}, "Engine: module.path must be a 'pkg.mod.Class' path, got 'Model'"),
        ({"path": "pkg.Model", "arg": {}}, "Engine: module has unknown key(s) ['arg']; it takes"),
        ({"path": "pkg.Model", "args": [1]}, "Engine: module.args must be an object, got [1]"),
    ],
)
def test_a_malformed_spec_is_one_line_naming_the_argument(value, message):
    with pytest.raises(SpecError) as refused:
        check_spec(value, "Engine", "module")
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_a_class_that_does_not_import_or_refuses_its_arguments_is_one_line():
    with pytest.raises(SpecError, match=r"^Engine: module class path 'no_such.Model' does not import: Module"):
        build(spec("no_such.Model"), "Engine", "module")
    with pytest.raises(SpecError, match=r"^Engine: module class path 'cifar10_example.network.Nope' does not import"):
        build(spec("cifar10_example.network.Nope"), "Engine", "module")
    with pytest.raises(SpecError) as refused:
        build(spec("cifar10_example.lit_module.LitCifarNet", lr=-1), "Engine", "module")
    assert str(refused.value) == (
        "Engine: module cifar10_example.lit_module.LitCifarNet refused its arguments: "
        "ValueError: lr must be > 0, got -1"
    )
    with pytest.raises(SpecError, match=r"refused its arguments: TypeError: .*unexpected keyword argument 'hidden'"):
        build(spec("cifar10_example.lit_module.LitCifarNet", hidden=3), "Engine", "module")


def test_the_key_metric_mode_is_said_not_guessed():
    lower = KeyMetricSelector(key_metric="global_val_mse", key_metric_mode="min")
    assert lower.negate_key_metric and mode_of(lower) == "min"
    higher = KeyMetricSelector(key_metric="global_val_loss_inverse", key_metric_mode="max")
    assert not higher.negate_key_metric and mode_of(higher) == "max"  # "loss" in the name changes nothing
    assert mode_of(IntimeModelSelector(key_metric="x", negate_key_metric=True)) == "min"
    with pytest.raises(
        ValueError, match=r'^KeyMetricSelector: key_metric_mode must be "max" or "min", got \'lowest\'$'
    ):
        KeyMetricSelector(key_metric="global_val_mse", key_metric_mode="lowest")
    with pytest.raises(ValueError, match=r"^KeyMetricSelector: key_metric must be a metric name, got ''$"):
        KeyMetricSelector(key_metric="")
