"""The Lightning logger's step arithmetic and hyperparameters, driven by real Lightning Trainers."""

import logging
import threading
import time

import pytest
import pytorch_lightning as pl
from nvflare.apis.signal import Signal

from cifar10_example.data import CifarDataModule
from cifar10_example.lit_module import LitCifarNet
from fl_lightning_mlflow.site.engine import TaskAborted
from fl_lightning_mlflow.site.flare_logger import MAX_PARAMS_PER_RECORD, METRICS, METRICS_BATCH, PARAMS, FlareLogger
from fl_lightning_mlflow.site.lightning_engine import AbortOnSignal

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


class Recorder:
    """What the executor's sender would fire as FLARE events, kept in order."""

    def __init__(self):
        self.records = []

    def __call__(self, kind, values, step, fl_round):
        self.records.append((kind, values if isinstance(values, list) else dict(values), step, fl_round))

    def steps(self):
        out = {}
        for kind, values, step, _ in self.records:
            if kind == METRICS:
                for key in values:
                    out.setdefault(key, []).append(step)
        return out


def test_steps_continue_across_rounds_and_stages():
    rec = Recorder()
    log = FlareLogger(rec)
    for fl_round in range(3):
        log.round = fl_round
        log.key_prefix = "global_"
        log.log_metrics({"val_acc": 0.5, "epoch": 0}, step=0)  # validate(): Lightning says step 0
        log.key_prefix = ""
        for s in (9, 19):
            log.log_metrics({"train_loss_step": 1.0, "epoch": 0}, step=s)  # fit restarts at 0 each round
        log.log_metrics({"val_acc": 0.6, "epoch": 0}, step=19)  # validation during fit
        log.log_metrics({"train_loss_epoch": 1.0, "epoch": 0}, step=20)
        log.advance(batches=20, epochs=1)
    steps = rec.steps()
    assert steps["global_val_acc"] == [0, 20, 40]
    assert steps["train_loss_step"] == [9, 19, 29, 39, 49, 59]
    assert steps["val_acc"] == [19, 39, 59]
    assert steps["train_loss_epoch"] == [20, 40, 60]
    for key, series in steps.items():
        assert all(b > a for a, b in zip(series, series[1:], strict=False)), (key, series)
    assert [r[3] for r in rec.records if "global_val_acc" in r[1]] == [0, 1, 2]
    epochs = [r[1]["epoch"] for r in rec.records if "epoch" in r[1]]
    assert epochs == sorted(epochs) and epochs[-1] == 2  # continued, not reset per round


def test_a_repeated_step_is_moved_past_the_last_one():
    rec = Recorder()
    log = FlareLogger(rec)
    for _ in range(3):
        log.log_metrics({"test_acc": 0.1}, step=0)  # e.g. test() called three times in one round
    assert rec.steps()["test_acc"] == [0, 1, 2]


def test_hyperparameters_are_flattened_sent_once_and_chunked():
    rec = Recorder()
    log = FlareLogger(rec)
    log.log_hyperparams({"lr": 0.1, "opt": {"name": "sgd", "momentum": 0.9}})
    log.log_hyperparams({"lr": 0.1})  # every Trainer logs them again: nothing new to send
    assert rec.records == [(PARAMS, {"lr": "0.1", "opt/momentum": "0.9", "opt/name": "sgd"}, None, None)]
    log.log_hyperparams({f"p{i:03d}": i for i in range(250)})
    chunks = [r[1] for r in rec.records[1:]]
    assert [len(c) for c in chunks] == [MAX_PARAMS_PER_RECORD, MAX_PARAMS_PER_RECORD, 50]


def test_hyperparameters_have_the_keys_lightnings_mlflow_logger_gives_them(tmp_path):
    """Dataclasses, namespaces, nested mappings and lists of mappings: the same keys and values as
    pytorch_lightning's own MLFlowLogger writes into a real MLflow store."""
    from argparse import Namespace
    from dataclasses import dataclass

    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    @dataclass
    class Inner:
        c: int = 1
        d: str = "x"

    @dataclass
    class Outer:
        a: Inner
        b: int = 3

    params = {"params": Outer(Inner()), "ns": Namespace(k=2, deep={"q": 0.5}), "dl": [{"a": 1}, {"b": 2}], "l": [1, 2]}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lightning = MLFlowLogger(experiment_name="flatten", tracking_uri=uri)
    lightning.log_hyperparams(params)
    theirs = MlflowClient(uri).get_run(lightning.run_id).data.params
    rec = Recorder()
    FlareLogger(rec).log_hyperparams(params)
    (ours,) = [values for kind, values, _, _ in rec.records if kind == PARAMS]
    assert ours == theirs
    assert {"params/a/c", "params/a/d", "params/b", "ns/k", "ns/deep/q", "dl/0/a", "dl/1/b", "l"} == set(ours)


def test_a_metric_name_mlflow_refuses_is_cleaned_on_the_site_with_one_warning(caplog):
    from fl_lightning_mlflow.common.protocol import check_key
    from fl_lightning_mlflow.site.flare_logger import SentCounter

    rec = Recorder()
    log = FlareLogger(rec)
    with caplog.at_level(logging.WARNING, logger="fl_lightning_mlflow.site.flare_logger"):
        for step in range(3):
            log.log_metrics({"acc@top1": 0.5, "val/../up": 1.0, "x" * 300: 2.0, "fine/name": 3.0}, step=step)
    names = {key for _, values, _, _ in rec.records for key in values}
    assert names == {"acctop1", "val/up", "x" * 250, "fine/name"}  # as Lightning's MLFlowLogger drops characters
    assert all(check_key(n) is None for n in names)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3  # one per name, not per point
    assert any("metric name 'acc@top1' is one MLflow refuses" in w and "sent as 'acctop1'" in w for w in warned)

    class Writer:  # an mlflow-like writer (FLARE's MLflowWriter's calls), as PTEngine logs through it
        def __init__(self):
            self.calls = []

        def log_metric(self, key, value, step=None):
            self.calls.append(key)

        def log_metrics(self, metrics, step=None):
            self.calls.extend(metrics)

    writer = Writer()
    counted = SentCounter().writer(writer)
    counted.log_metric("loss#1", 1.0)
    counted.log_metrics({"top 1%": 1.0, "ok": 2.0})
    assert writer.calls == ["loss1", "top 1", "ok"]


def test_real_trainers_over_two_rounds_give_strictly_increasing_steps(offline_data):
    rec = Recorder()
    log = FlareLogger(rec)
    data = CifarDataModule(str(offline_data), "site-1", batch_size=64)
    model = LitCifarNet()
    for fl_round in range(2):
        log.round = fl_round
        log.key_prefix = "global_"
        pl.Trainer(logger=log, limit_val_batches=3, enable_progress_bar=False, enable_model_summary=False).validate(
            model, datamodule=data, verbose=False
        )
        log.key_prefix = ""
        trainer = pl.Trainer(
            max_epochs=2,
            logger=log,
            log_every_n_steps=5,
            limit_train_batches=12,  # a few batches show the step arithmetic as well as all of them
            limit_val_batches=3,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=data)
        log.advance(trainer.global_step, 2)
        assert trainer.global_step == 24
    steps = rec.steps()
    for key, series in steps.items():
        assert all(b > a for a, b in zip(series, series[1:], strict=False)), (key, series)
    assert len(steps["global_val_acc"]) == 2
    assert len(steps["val_acc"]) == len(steps["train_loss_epoch"]) == 4
    assert {"lr", "optimizer", "momentum", "weight_decay", "batch_size"} <= {
        k for kind, values, _, _ in rec.records if kind == PARAMS for k in values
    }


def test_abort_signal_stops_a_running_trainer_within_seconds(offline_data):
    signal = Signal()
    data = CifarDataModule(str(offline_data), "site-1", batch_size=8)
    trainer = pl.Trainer(
        max_epochs=1000,
        logger=False,
        callbacks=[AbortOnSignal(signal)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    threading.Timer(1.0, signal.trigger, args=("test abort",)).start()
    started = time.monotonic()
    with pytest.raises(TaskAborted):
        trainer.fit(LitCifarNet(), datamodule=data)
    assert time.monotonic() - started < 6


def test_batched_records_go_out_once_a_second_and_at_every_stage_end():
    rec = Recorder()
    log = FlareLogger(rec, flush_seconds=3600)  # only stage ends flush here
    for s in range(5):
        log.log_metrics({"train_loss_step": 1.0}, step=s)
    assert rec.records == []
    log.finalize("success")  # Lightning calls this at the end of fit / validate / test
    ((kind, records, step, _),) = rec.records
    assert kind == METRICS_BATCH and step == 4
    assert [r[0] for r in records] == [0, 1, 2, 3, 4] and log.points_sent == 5


def test_sent_counts_are_exact_with_two_threads_counting():
    """The system-metrics thread and the task's thread both count what they send."""
    from fl_lightning_mlflow.site.flare_logger import SentCounter

    counter = SentCounter({"metric": 5, "bogus": 3, "param": -1})
    assert counter.snapshot()["metric"] == 5 and counter.snapshot()["param"] == 0  # bad start values dropped

    def send():
        for _ in range(20_000):
            counter.record(METRICS, {"a": 1.0, "b": 2.0})

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.snapshot()["metric"] == 5 + 2 * 20_000 * 2
