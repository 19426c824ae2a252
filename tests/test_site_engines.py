"""The two site engines, driven as the executor drives them, without FLARE: fit from given
global weights, evaluate given weights, what they log, abort, state across a restart, bad args."""

import logging
import math
import threading
import time

import numpy as np
import pytest
import torch
from nvflare.apis.signal import Signal

from cifar10_example.data import SiteDataError
from cifar10_example.network import CifarNet
from conftest import cifar_engine
from fl_lightning_mlflow.common.protocol import GLOBAL_PREFIX, METRICS, METRICS_BATCH, PARAMS
from fl_lightning_mlflow.site.engine import FitResult, SiteContext, SiteEngine, TaskAborted, make_optimizer
from fl_lightning_mlflow.site.executor import SiteExecutor
from fl_lightning_mlflow.site.lightning_engine import LightningEngine
from fl_lightning_mlflow.site.pt_engine import PTEngine

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

BATCH, LOG_EVERY = 128, 5
ENGINES = {"lightning": LightningEngine, "pt": PTEngine}


class Sink:
    """Where an engine's metrics go: the executor's sender (Lightning) or an mlflow-like writer
    (the plain loop; FLARE's MLflowWriter has the same calls). Keeps what arrived, per metric."""

    def __init__(self):
        self.series, self.params, self.tags = {}, {}, {}

    def _add(self, values: dict, step) -> None:
        for key, value in values.items():
            self.series.setdefault(key, []).append((step, value))

    # the executor's sender, for LightningEngine's FlareLogger
    def __call__(self, kind, values, step, fl_round):
        if kind == PARAMS:
            self.params.update(values)
        elif kind == METRICS:
            self._add(values, step)
        elif kind == METRICS_BATCH:
            for record_step, _, record in values:
                self._add(record, record_step)

    # MLflowWriter's calls, for PTEngine
    def log_params(self, values):
        self.params.update({k: str(v) for k, v in values.items()})

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step=None):
        self._add(metrics, step)

    def log_metric(self, key, value, step=None):
        self._add({key: value}, step)

    def points(self) -> int:
        return sum(len(v) for v in self.series.values())


@pytest.fixture(autouse=True)
def _one_torch_thread(one_thread):
    """Every test here trains on one thread (conftest.one_thread)."""


def make_engine(kind, data_root, tmp_path, sink=None, **args):
    engine = cifar_engine(kind, data_root, batch_size=BATCH, log_every_n_steps=LOG_EVERY, **args)
    sink = sink if sink is not None else Sink()
    ctx = SiteContext(site="site-1", workdir=tmp_path, threads=1, send=sink, writer=sink)
    engine.setup(ctx)
    return engine, sink


def global_weights(seed: int) -> dict:
    """What FLARE hands a site: numpy arrays of the global model."""
    return {k: v.numpy() for k, v in CifarNet(init_seed=seed).state_dict().items()}


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))


@pytest.mark.parametrize("kind", ENGINES)
def test_two_rounds_from_given_global_weights_with_a_restart_between(kind, offline_data, tmp_path):
    """As the executor's train task runs them: evaluate the global model (logged with the global
    prefix), fit from it; round 1 in a fresh engine restored from round 0's state, as a simulator
    worker restarted between tasks is."""
    sink = Sink()
    engine, _ = make_engine(kind, offline_data, tmp_path, sink)
    assert isinstance(engine, SiteEngine) and (engine.train_samples, engine.val_samples) == (2700, 300)
    steps_per_round = math.ceil(engine.train_samples / BATCH)
    results = []
    for fl_round, seed in enumerate((10, 11)):
        if fl_round == 1:
            state = engine.state_dict()
            engine, _ = make_engine(kind, offline_data, tmp_path, sink)
            engine.load_state_dict(state)
        start = global_weights(seed)
        global_metrics = engine.evaluate(start, None, fl_round=fl_round, log_prefix=GLOBAL_PREFIX)
        assert set(global_metrics) == {"val_loss", "val_acc"} and 0 <= global_metrics["val_acc"] <= 1
        fit = engine.fit(start, fl_round, None)
        assert isinstance(fit, FitResult)
        assert fit.samples == engine.train_samples and fit.steps == steps_per_round
        assert set(fit.metrics) == {"val_loss", "val_acc"}
        assert set(fit.weights) == set(start) and all(isinstance(v, np.ndarray) for v in fit.weights.values())
        # Trained from the weights it was given: a small step away from them, not from its own init.
        moved = distance(fit.weights, start)
        assert 0 < moved < distance(global_weights(seed + 100), start) / 10
        results.append(fit)

    # What reached the sink: the series the server stores today, on one step axis that carries on.
    for key, series in sink.series.items():
        steps = [s for s, _ in series]
        assert steps == sorted(steps) and len(set(steps)) == len(steps), (key, steps)
    counts = {k: len(v) for k, v in sink.series.items()}
    step_points = 2 * (steps_per_round // LOG_EVERY)
    assert counts[f"{GLOBAL_PREFIX}val_acc"] == counts[f"{GLOBAL_PREFIX}val_loss"] == 2
    if kind == "lightning":
        assert counts["val_acc"] == counts["val_loss"] == counts["train_loss_epoch"] == counts["train_acc_epoch"] == 2
        assert counts["train_loss_step"] == counts["train_acc_step"] == step_points
        assert sink.series["train_loss_epoch"][-1][0] == 2 * steps_per_round - 1
    else:
        assert counts["local_accuracy"] == counts["local_val_loss"] == 2
        assert counts["train_loss"] == counts["train_acc"] == step_points
        assert sink.series["local_accuracy"][-1][0] == 2 * steps_per_round - 1
        assert sink.tags == {"trainer": "plain PyTorch loop"}
    assert sink.series[f"{GLOBAL_PREFIX}val_acc"][1][0] >= steps_per_round  # round 1 is after round 0
    expected_params = {"lr", "optimizer", "momentum", "weight_decay", "batch_size", "site", "local_epochs"}
    expected_params |= {"train_samples", "val_samples", "accelerator", "torch_threads", "seed", "split", "alpha"}
    assert set(sink.params) == expected_params | {"split_seed"}  # the 15 params of a site's run
    assert sink.params["train_samples"] == "2700" and sink.params["batch_size"] == str(BATCH)


@pytest.mark.parametrize("kind", ENGINES)
def test_evaluate_uses_the_weights_it_is_given_and_logs_only_when_asked(kind, offline_data, tmp_path):
    engine, sink = make_engine(kind, offline_data, tmp_path)
    a, b = global_weights(1), global_weights(2)
    first = engine.evaluate(a, None)
    assert engine.evaluate(b, None) != first
    assert engine.evaluate(a, None) == pytest.approx(first)
    assert sink.points() == 0 and engine.points_sent == 0  # validate task: nothing logged
    engine.evaluate(a, None, fl_round=0, log_prefix="global_")
    assert {"global_val_acc", "global_val_loss"} <= set(sink.series)  # Lightning adds its "epoch"
    assert not {"val_acc", "val_loss"} & set(sink.series)
    assert engine.points_sent == sink.points() >= 2


@pytest.mark.parametrize("kind", ENGINES)
def test_an_abort_signal_stops_training_within_seconds(kind, offline_data, tmp_path):
    engine, _ = make_engine(kind, offline_data, tmp_path, local_epochs=1000, tracking=False)
    signal = Signal()
    threading.Timer(0.5, signal.trigger, args=("test abort",)).start()
    started = time.monotonic()
    with pytest.raises(TaskAborted):
        engine.fit(global_weights(0), 0, signal)
    assert time.monotonic() - started < 6
    with pytest.raises(TaskAborted):  # an already fired signal stops an evaluation at once
        engine.evaluate(global_weights(0), signal)


@pytest.mark.parametrize("kind", ENGINES)
def test_missing_site_data_fails_setup_with_one_line(kind, tmp_path):
    engine = cifar_engine(kind, tmp_path / "nowhere")
    with pytest.raises(SiteDataError, match=r"^site site-1: missing data folder: .*nowhere$"):
        engine.setup(SiteContext(site="site-1", workdir=tmp_path, writer=Sink()))


def test_the_plain_loop_needs_its_writer_only_when_tracking(offline_data, tmp_path):
    with pytest.raises(ValueError, match=r"^PTEngine: no log writer \(component 'mlflow_writer', an MLflowWriter\)$"):
        cifar_engine("pt", offline_data).setup(SiteContext(site="site-1", workdir=tmp_path))
    assert cifar_engine("pt", offline_data, tracking=False).writer_id is None


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize(
    "arg,value,message",
    [
        ("local_epochs", 0, "local_epochs must be an integer >= 1, got 0"),
        ("local_epochs", "2", "local_epochs must be an integer >= 1, got '2'"),
        ("log_every_n_steps", True, "log_every_n_steps must be an integer >= 1, got True"),
        ("accelerator", "tpu", "accelerator must be auto, cpu or gpu, got 'tpu'"),
        ("tracking", "yes", "tracking must be true or false, got 'yes'"),
        ("fedprox_mu", -1, "fedprox_mu must be a number >= 0 (0: FedAvg), got -1"),
        ("datamodule", "", "datamodule must be "),
        ("datamodule", {"path": "pkg.Data", "argz": {}}, "datamodule has unknown key(s) ['argz']"),
        ("datamodule", {"path": "Data"}, "datamodule.path must be a 'pkg.mod.Class' path, got 'Data'"),
    ],
)
def test_a_bad_shared_argument_is_refused_in_one_line(kind, arg, value, message, offline_data):
    """Every engine takes the same argument set (SiteEngine's) and refuses a bad one alike."""
    with pytest.raises(ValueError) as refused:
        cifar_engine(kind, offline_data, **{arg: value})
    assert str(refused.value).startswith(f"{ENGINES[kind].__name__}: {message}")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "kind,arg,value,message",
    [
        ("pt", "lr", 50, "lr must be a number in (0, 10.0], got 50"),
        ("pt", "lr", 0, "lr must be a number in (0, 10.0], got 0"),
        ("pt", "optimizer", "x", "optimizer must be one of ('sgd', 'adam', 'adamw'), got 'x'"),
        ("pt", "momentum", -1, "momentum must be a number >= 0, got -1"),
        ("pt", "network", None, "network must be "),
        ("lightning", "module", None, "module must be "),
        ("lightning", "trainer", {"max_epochs": 3}, "trainer.max_epochs is set by the engine"),
        ("lightning", "trainer", {"logger": False}, "trainer.logger is set by the engine"),
        ("lightning", "trainer", {"gradient_clip": 1.0}, "trainer.gradient_clip is not a pytorch_lightning.Trainer "
                                                         "argument (did you mean 'gradient_clip_val'?)"),
        ("lightning", "trainer", [1], "trainer must be an object of Trainer arguments, got [1]"),
        ("lightning", "metrics_flush_seconds", -1, "metrics_flush_seconds must be a number >= 0, got -1"),
    ],
)  # fmt: skip
def test_an_engine_refuses_a_bad_argument_of_its_own_in_one_line(kind, arg, value, message, offline_data):
    cls = ENGINES[kind]
    spec = {"path": "cifar10_example.data.CifarDataModule", "config_type": "dict", "args": {}}
    with pytest.raises(ValueError) as refused:
        args = {"datamodule": spec, ("module" if kind == "lightning" else "network"): spec, arg: value}
        cls(**args)
    assert str(refused.value).startswith(f"{cls.__name__}: {message}")


def test_a_datamodule_that_is_not_there_or_refuses_its_arguments_fails_setup_in_one_line(offline_data, tmp_path):
    missing = {"path": "no_such_pkg.Data", "config_type": "dict", "args": {}}
    engine = LightningEngine(module=missing, datamodule=missing)
    with pytest.raises(
        ValueError, match=r"^LightningEngine: datamodule class path 'no_such_pkg.Data' does not import: "
    ):
        engine.setup(SiteContext(site="site-1", workdir=tmp_path))
    engine = cifar_engine("lightning", offline_data, batch_size=32)
    engine.args.datamodule["args"]["batch_sise"] = 32
    with pytest.raises(ValueError, match=r"^LightningEngine: datamodule cifar10_example.data.CifarDataModule refused"):
        engine.setup(SiteContext(site="site-1", workdir=tmp_path))


def test_the_datamodule_learns_its_site_and_the_module_is_any_lightning_module(offline_data, tmp_path):
    engine = cifar_engine("lightning", offline_data)
    engine.setup(SiteContext(site="site-2", workdir=tmp_path))
    assert engine.data.site == "site-2" and engine.site == "site-2"
    not_a_module = {"path": "cifar10_example.network.CifarNet", "config_type": "dict", "args": {}}
    engine = LightningEngine(module=not_a_module, datamodule=engine.args.datamodule)
    with pytest.raises(
        ValueError, match=r"^LightningEngine: module cifar10_example.network.CifarNet is not a Lightning"
    ):
        engine.setup(SiteContext(site="site-1", workdir=tmp_path))


def test_trainer_arguments_pass_through_to_lightnings_trainer(offline_data, tmp_path):
    engine = cifar_engine("lightning", offline_data, trainer={"limit_train_batches": 3, "gradient_clip_val": 0.5})
    engine.setup(SiteContext(site="site-1", workdir=tmp_path, threads=1))
    fit = engine.fit(global_weights(0), 0, None)
    assert fit.steps == 3 and fit.samples == engine.train_samples  # the Trainer stopped after 3 batches
    trainer = engine._trainer(None, max_epochs=1)
    assert trainer.gradient_clip_val == 0.5 and trainer.max_epochs == 1


def test_weights_of_another_model_are_refused_in_one_line(offline_data, tmp_path):
    engine, _ = make_engine("lightning", offline_data, tmp_path)
    weights = {**global_weights(0), "extra.weight": np.zeros(3, dtype=np.float32)}
    del weights["features.0.weight"]
    with pytest.raises(
        ValueError, match=r"^the global model does not fit the site's LitCifarNet: missing \['features.0.weight'\]"
    ):
        engine.evaluate(weights, None)


def test_the_executor_checks_its_own_arguments():
    with pytest.raises(ValueError, match=r"^SiteExecutor: threads_per_site must be an integer >= 0, got -1$"):
        SiteExecutor(threads_per_site=-1)
    with pytest.raises(ValueError, match=r"^SiteExecutor: engine_id must be a component id, got ''$"):
        SiteExecutor(engine_id="")
    with pytest.raises(ValueError, match=r'^SiteExecutor: key_metric_mode must be "max" or "min", got \'low\'$'):
        SiteExecutor(key_metric_mode="low")
    assert SiteExecutor(engine_id="engine", threads_per_site=2).task_names == ("train", "validate", "submit_model")


def test_the_best_local_model_follows_the_key_metric_and_its_mode():
    lowest = SiteExecutor(key_metric="val_mse", key_metric_mode="min")
    assert [lowest._better_local({"val_mse": v}) for v in (0.5, 0.7, 0.3, 0.3)] == [True, False, True, False]
    highest = SiteExecutor(key_metric="val_acc")
    assert [highest._better_local({"val_acc": v}) for v in (0.5, 0.7, 0.3)] == [True, True, False]
    assert SiteExecutor()._better_local({}) is True  # no key metric: the last local model


def test_the_plain_loop_builds_its_optimizer_from_its_settings():
    net = CifarNet()
    sgd = make_optimizer(net.parameters(), "sgd", lr=0.1, momentum=0.5, weight_decay=0.01)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.5
    assert isinstance(make_optimizer(net.parameters(), "adamw", lr=0.1), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer(net.parameters(), "rmsprop")
