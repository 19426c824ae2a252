"""The plain PyTorch engine: a hand-written training loop, logging through FLARE's MLflowWriter.

For users who don't write Lightning. Same data, network, optimizer settings and weight exchange
as the Lightning engine; its metrics go through MLflowWriter, which mimics the mlflow API on the
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

from fl_lightning_mlflow.common.network import CifarNet
from fl_lightning_mlflow.site.algorithms import ScaffoldSite, frozen_parameters, proximal_term
from fl_lightning_mlflow.site.data import SiteDataModule
from fl_lightning_mlflow.site.engine import (
    AbortSignal,
    FitResult,
    SiteContext,
    SiteEngine,
    TrainingArgs,
    Weights,
    check_abort,
    load_weights,
    make_optimizer,
    numpy_weights,
)


def seed_everything(seed: int) -> None:
    """What Lightning's seed_everything seeds (Python, numpy, torch), so both engines start alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PTEngine(SiteEngine):
    supports_scaffold = True

    def __init__(
        self,
        data_root: str = "/tmp/nvflare/data/cifar10",
        local_epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.02,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        log_every_n_steps: int = 10,
        tracking: bool = True,
        accelerator: str = "auto",
        num_workers: int = 0,
        seed: int = 0,
        mlflow_writer_id: str = "mlflow_writer",
        fedprox_mu: float = 0.0,
    ):
        """Args are set in config_fed_client.json (the "engine" component); as LightningEngine's, plus
        mlflow_writer_id: the client component id of the MLflowWriter (needed when tracking)."""
        self.args = TrainingArgs(
            data_root=data_root,
            local_epochs=local_epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
            log_every_n_steps=log_every_n_steps,
            tracking=tracking,
            accelerator=accelerator,
            num_workers=num_workers,
            seed=seed,
            fedprox_mu=fedprox_mu,
        )
        self.args.check(type(self).__name__)
        if not isinstance(mlflow_writer_id, str) or not mlflow_writer_id:
            raise ValueError(
                f"{type(self).__name__}: mlflow_writer_id must be a component id, got {mlflow_writer_id!r}"
            )
        self.writer_id = mlflow_writer_id if tracking else None
        self.writer = None
        self.net = self.data = None
        self.device = torch.device("cpu")
        self.step = 0  # optimizer steps taken in all rounds so far: the MLflow step axis
        self.epochs = 0
        self.points_sent = 0
        self.site_params = {}
        self._params_sent = False
        self.workdir = None
        self.scaffold: ScaffoldSite | None = None  # built at the first SCAFFOLD task

    # ----- SiteEngine --------------------------------------------------------------------
    def setup(self, ctx: SiteContext) -> None:
        a = self.args
        if a.tracking and ctx.writer is None:
            raise ValueError(f"{type(self).__name__}: no log writer (component {self.writer_id!r}, an MLflowWriter)")
        self.writer = ctx.writer
        self.workdir = ctx.workdir
        torch.set_num_threads(ctx.threads)
        seed_everything(a.seed)  # before the network is built: the same seed gives the same run
        self.data = SiteDataModule(a.data_root, ctx.site, a.batch_size, a.num_workers)
        self.data.load()  # fail now, with one clear line, rather than mid-round
        cuda = a.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        self.net = CifarNet().to(self.device)
        self.train_samples, self.val_samples = len(self.data.train_set), len(self.data.val_set)
        self.site_params = a.site_params(ctx.site, ctx.threads, self.train_samples, self.val_samples)

    def describe(self) -> str:
        return f"from {self.args.data_root}; accelerator={self.args.accelerator} ({self.device})"

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
        optimizer = make_optimizer(self.net.parameters(), **a.optimizer_args())
        scaffold = None
        if global_controls is not None:
            if self.scaffold is None:
                self.scaffold = ScaffoldSite(self.workdir)
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
        return {"val_loss": loss_sum / max(n, 1), "val_acc": correct / max(n, 1)}

    def _batches(self, loader, abort_signal: AbortSignal | None):
        for x, y in loader:
            check_abort(abort_signal)
            yield x.to(self.device), y.to(self.device)

    def _send_params(self) -> None:
        # Once per process: MLflowWriter has no round, and a param's value may not change.
        if self._params_sent or not self.args.tracking:
            return
        self.writer.log_params({**self.args.optimizer_args(), "batch_size": self.args.batch_size, **self.site_params})
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
