"""The plain PyTorch engine: a hand-written training loop, logging through FLARE's MLflowWriter.

For users who don't write Lightning: a classification network (an nn.Module named by class path,
trained with cross entropy) on the same kind of DataModule as the Lightning engine's, with the same
weight exchange; its metrics go through MLflowWriter, which mimics the mlflow API on the
site (log_metric, log_metrics, log_params, set_tags) and streams to the FL server as
FlareLogger does, so both jobs land in the same MLflow run tree. The executor looks the writer
up by `mlflow_writer_id` and hands it over (SiteContext.writer); any object with that mlflow-like
API will do, which is how the tests run this engine without FLARE.

Its own step counter gives MLflow one axis per site that carries on across rounds (MLflowWriter
has no notion of a round).

Algorithms (site.algorithms), as in the Lightning engine: fedprox_mu > 0 adds FedProx's proximal
term to the loss (logged as train_prox_loss); a task that brings SCAFFOLD's global controls gets
the control correction after every optimizer step and returns the change of the site's controls.
"""

import random

import numpy as np
import torch
from torch.nn import functional as F

from fl_lightning_mlflow.common.class_spec import build, check_spec, path_of
from fl_lightning_mlflow.site.algorithms import ScaffoldSite, frozen_parameters, proximal_term
from fl_lightning_mlflow.site.engine import (
    AbortSignal,
    FitResult,
    SiteContext,
    SiteEngine,
    Weights,
    check_abort,
    check_optimizer,
    load_weights,
    make_optimizer,
    numpy_weights,
)

VALIDATION_METRICS = ("val_loss", "val_acc")  # what this engine measures: cross entropy, accuracy


def seed_everything(seed: int) -> None:
    """What Lightning's seed_everything seeds (Python, numpy, torch), so both engines start alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PTEngine(SiteEngine):
    supports_scaffold = True

    def __init__(self, network: dict | object = None, lr: float = 0.02, optimizer: str = "sgd", momentum: float = 0.9,
                 weight_decay: float = 0.0, mlflow_writer_id: str = "mlflow_writer", **engine_args):  # fmt: skip
        """Args are set in config_fed_client.json (the "engine" component); besides every engine's
        (site.engine.SiteEngine: datamodule, local_epochs, ...):

        network: the classification network, {"path": "pkg.mod.Class", "config_type": "dict",
            "args": {...}}, an nn.Module mapping a batch's inputs to class logits.
        lr, optimizer ("sgd", "adam", "adamw"), momentum (SGD's), weight_decay: the optimizer.
        mlflow_writer_id: the client component id of the MLflowWriter (needed when tracking)."""
        super().__init__(**engine_args)
        owner = type(self).__name__
        check_spec(network, owner, "network")
        check_optimizer(owner, lr, optimizer, momentum, weight_decay)
        if not isinstance(mlflow_writer_id, str) or not mlflow_writer_id:
            raise ValueError(f"{owner}: mlflow_writer_id must be a component id, got {mlflow_writer_id!r}")
        self.network_spec = network
        self.optimizer_args = dict(lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay)
        self.writer_id = mlflow_writer_id if self.args.tracking else None
        self.writer = None
        self.net = None
        self.device = torch.device("cpu")
        self.step = 0  # optimizer steps taken in all rounds so far: the MLflow step axis
        self.epochs = 0
        self.points_sent = 0
        self.site_params = {}
        self._params_sent = False
        self.workdir = self.site_root = None
        self.scaffold: ScaffoldSite | None = None  # built at the first SCAFFOLD task

    # ----- SiteEngine --------------------------------------------------------------------
    def setup(self, ctx: SiteContext) -> None:
        a = self.args
        if a.tracking and ctx.writer is None:
            raise ValueError(f"{type(self).__name__}: no log writer (component {self.writer_id!r}, an MLflowWriter)")
        self.writer = ctx.writer
        self.workdir, self.site_root = ctx.workdir, ctx.site_root
        torch.set_num_threads(ctx.threads)
        seed_everything(a.seed)  # before anything is built: the same seed gives the same run
        self._setup_data(ctx.site)
        cuda = a.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        net = build(self.network_spec, type(self).__name__, "network")
        if not isinstance(net, torch.nn.Module):
            raise ValueError(f"{type(self).__name__}: network {path_of(self.network_spec)} is not a torch nn.Module")
        self.net = net.to(self.device)
        self.site_params = self._site_params(ctx.threads)

    def describe(self) -> str:
        return (
            f"{path_of(self.network_spec)} on {path_of(self.args.datamodule)}; "
            f"accelerator={self.args.accelerator} ({self.device})"
        )

    def state_dict(self) -> dict:
        return {"step": self.step, "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.step = state.get("step", 0)
        self.epochs = state.get("epochs", 0)

    def evaluate(
        self,
        weights: Weights,
        abort_signal: AbortSignal | None,
        fl_round: int | None = None,
        log_prefix: str | None = None,
    ) -> dict:
        load_weights(self.net, weights)
        if log_prefix is not None:
            self._send_params()
        metrics = self._evaluate(abort_signal)
        if log_prefix is not None:
            self._log({f"{log_prefix}{k}": v for k, v in metrics.items()}, step=self.step)
        return metrics

    def fit(
        self,
        global_weights: Weights,
        fl_round: int | None,
        abort_signal: AbortSignal | None,
        global_controls: Weights | None = None,
    ) -> FitResult:
        a = self.args
        load_weights(self.net, global_weights)
        self._send_params()
        optimizer = make_optimizer(self.net.parameters(), **self.optimizer_args)
        scaffold = None
        if global_controls is not None:
            if self.scaffold is None:
                self.scaffold = ScaffoldSite(self.workdir, self.site_root)
            scaffold = self.scaffold
            scaffold.start(self.net, global_controls)
        prox_to = frozen_parameters(self.net, global_weights) if a.fedprox_mu > 0 else None
        first = self.step
        local = {}
        try:
            for _ in range(a.local_epochs):
                self.net.train()
                for i, (x, y) in enumerate(self._batches(self.data.train_dataloader(), abort_signal)):
                    optimizer.zero_grad()
                    logits = self.net(x)
                    loss = F.cross_entropy(logits, y)
                    prox = None
                    if prox_to is not None:  # FedProx
                        prox = proximal_term(self.net.named_parameters(), prox_to, a.fedprox_mu)
                    (loss if prox is None else loss + prox).backward()
                    if scaffold is not None:
                        scaffold.step_lr(optimizer)
                    optimizer.step()
                    if scaffold is not None:
                        scaffold.corrected(self.net)
                    if (i + 1) % a.log_every_n_steps == 0:
                        acc = float((logits.argmax(dim=1) == y).float().mean())
                        logged = {"train_loss": loss.item(), "train_acc": acc}
                        if prox is not None:
                            logged["train_prox_loss"] = prox.item()
                        self._log(logged, step=self.step)
                    self.step += 1
                local = self._evaluate(abort_signal)
                # The call FLARE's MLflowWriter offers, as in mlflow: one metric, explicit step.
                self._log_one("local_accuracy", local["val_acc"], step=self.step - 1)
                self._log_one("local_val_loss", local["val_loss"], step=self.step - 1)
        except BaseException:
            if scaffold is not None:
                scaffold.abort()
            raise
        control_diff = scaffold.finish(self.net) if scaffold is not None else None
        self.epochs += a.local_epochs
        return FitResult(
            weights=numpy_weights(self.net),
            samples=self.train_samples * a.local_epochs,
            steps=self.step - first,
            metrics=local,
            control_diff=control_diff,
        )

    def dry_validation(self, weights: Weights | None = None) -> set | str:
        """For flctl check, after _setup_data: the validation metric names, from one batch through
        the network (with weights loaded, e.g. the server's initial model), or why it failed."""
        net = build(self.network_spec, type(self).__name__, "network")  # a SpecError is the caller's line
        try:
            if weights is not None:
                load_weights(net, weights)
            x, y = next(iter(self.data.val_dataloader()))
            with torch.no_grad():
                logits = net(x)
                F.cross_entropy(logits, y)
        except Exception as e:  # noqa: BLE001 - the user's code: whatever it raises is the finding
            return f"{type(e).__name__}: {str(e)[:300]}"
        return set(VALIDATION_METRICS)

    # ----- helpers -----------------------------------------------------------------------
    def _evaluate(self, abort_signal: AbortSignal | None) -> dict:
        self.net.eval()
        loss_sum, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for x, y in self._batches(self.data.val_dataloader(), abort_signal):
                logits = self.net(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(dim=1) == y).sum())
                n += len(y)
        return dict(zip(VALIDATION_METRICS, (loss_sum / max(n, 1), correct / max(n, 1)), strict=True))

    def _batches(self, loader, abort_signal: AbortSignal | None):
        for x, y in loader:
            check_abort(abort_signal)
            yield x.to(self.device), y.to(self.device)

    def _send_params(self) -> None:
        # Once per process: MLflowWriter has no round, and a param's value may not change.
        if self._params_sent or not self.args.tracking:
            return
        hparams = dict(getattr(self.data, "hparams", None) or {})  # the DataModule's, as Lightning logs them
        self.writer.log_params({**self.optimizer_args, **hparams, **self.site_params})
        self.writer.set_tags({"trainer": "plain PyTorch loop"})
        self._params_sent = True

    def _log(self, metrics: dict, step: int) -> None:
        if self.args.tracking:
            self.writer.log_metrics(metrics, step=step)
            self.points_sent += len(metrics)

    def _log_one(self, key: str, value: float, step: int) -> None:
        if self.args.tracking:
            self.writer.log_metric(key=key, value=value, step=step)
            self.points_sent += 1
