"""The Lightning engine: a fresh Trainer per task around one LitCifarNet and the site's data.

Every self.log(...) of the LightningModule goes to FlareLogger, which puts it on one step axis
per site that never restarts and hands it to the executor's sender (one FLARE event about once
a second). An abort signal stops the running Trainer at the next batch (AbortOnSignal).

Algorithms (site.algorithms): fedprox_mu > 0 adds FedProx's proximal term in the LightningModule's
training_step, against the task's global weights; a task that brings SCAFFOLD's global controls
gets the control correction after every optimizer step (ScaffoldCorrection) and returns the
change of the site's controls with the result.
"""

import pytorch_lightning as pl
import torch

from fl_lightning_mlflow.site.algorithms import ScaffoldSite
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
    numpy_weights,
)
from fl_lightning_mlflow.site.flare_logger import FlareLogger
from fl_lightning_mlflow.site.lit_module import LitCifarNet


class AbortOnSignal(pl.Callback):
    """Stops the Trainer at the next batch once FLARE fires the task's abort signal."""

    def __init__(self, abort_signal: AbortSignal | None):
        self.abort_signal = abort_signal

    def _check(self, *args, **kwargs):
        check_abort(self.abort_signal)

    on_train_batch_start = _check
    on_validation_batch_start = _check
    on_test_batch_start = _check


class ScaffoldCorrection(pl.Callback):
    """SCAFFOLD's correction w -= lr * (c - c_i) after each optimizer step (PTScaffoldHelper's
    model_update, through site.algorithms.ScaffoldSite), on the LightningModule's network."""

    def __init__(self, scaffold: ScaffoldSite):
        self.scaffold = scaffold

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.scaffold.step_lr(optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scaffold.corrected(pl_module.net)


def _no_send(kind, values, step, fl_round) -> None:
    pass


class LightningEngine(SiteEngine):
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
        metrics_flush_seconds: float = 1.0,
        accelerator: str = "auto",
        num_workers: int = 0,
        seed: int = 0,
        fedprox_mu: float = 0.0,
    ):
        """Args are set in config_fed_client.json (the "engine" component).

        accelerator: "auto" (GPU when one is visible, else CPU), "cpu" or "gpu".
        tracking: stream metrics and params to the server (false: train without a logger).
        metrics_flush_seconds: send a site's metric records as one FLARE event at most this often
            (FederatedMLflowTracker unpacks them); 0 = one event per log call, which FLARE's stock
            MLflowReceiver also understands.
        num_workers: DataLoader worker processes (0: load in the training process).
        fedprox_mu: FedProx's proximal weight mu (loss + mu/2 * ||w - w_global||^2); 0 = FedAvg.
        SCAFFOLD needs no argument: it runs when the server's workflow (ScatterAndGatherScaffold)
        sends control variates with the task.
        """
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
        if not isinstance(metrics_flush_seconds, (int, float)) or isinstance(metrics_flush_seconds, bool):
            metrics_flush_seconds = -1
        if metrics_flush_seconds < 0:
            raise ValueError(
                f"{type(self).__name__}: metrics_flush_seconds must be a number >= 0, got {metrics_flush_seconds!r}"
            )
        self.metrics_flush_seconds = metrics_flush_seconds
        self.module = self.data = self.logger = None
        self.workdir = None
        self.site_params = {}
        self.scaffold: ScaffoldSite | None = None  # built at the first SCAFFOLD task

    # ----- SiteEngine --------------------------------------------------------------------
    def setup(self, ctx: SiteContext) -> None:
        a = self.args
        torch.set_num_threads(ctx.threads)
        # Seeded before the model is built, as before: the same seed gives the same run.
        pl.seed_everything(a.seed, verbose=False)
        self.data = SiteDataModule(a.data_root, ctx.site, a.batch_size, a.num_workers)
        self.data.load()  # fail now, with one clear line, rather than mid-round
        self.module = LitCifarNet(**a.optimizer_args(), fedprox_mu=a.fedprox_mu)
        # Always built (it carries the step axis); attached to Trainers only when tracking.
        self.logger = FlareLogger(ctx.send or _no_send, site=ctx.site, flush_seconds=self.metrics_flush_seconds)
        self.workdir = ctx.workdir
        self.train_samples, self.val_samples = len(self.data.train_set), len(self.data.val_set)
        # Sent with the first round, beside the LightningModule's and the DataModule's own
        # hyperparameters, which every Trainer logs.
        self.site_params = a.site_params(ctx.site, ctx.threads, self.train_samples, self.val_samples)

    def describe(self) -> str:
        return f"from {self.args.data_root}; accelerator={self.args.accelerator}"

    @property
    def points_sent(self) -> int:
        return self.logger.points_sent if self.logger is not None else 0

    def state_dict(self) -> dict:
        return {"step_offset": self.logger.step_offset, "epoch_offset": self.logger.epoch_offset}

    def load_state_dict(self, state: dict) -> None:
        self.logger.step_offset = state.get("step_offset", 0)
        self.logger.epoch_offset = state.get("epoch_offset", 0)

    def evaluate(
        self,
        weights: Weights,
        abort_signal: AbortSignal | None,
        fl_round: int | None = None,
        log_prefix: str | None = None,
    ) -> dict:
        load_weights(self.module.net, weights)
        logged = log_prefix is not None and self.args.tracking
        if logged:
            self._start_round(fl_round)
            self.logger.key_prefix = log_prefix
        try:
            trainer = self._trainer(abort_signal, logged=logged)
            (results,) = trainer.validate(self.module, datamodule=self.data, verbose=False)
        finally:
            self.logger.key_prefix = ""
        return {k: float(v) for k, v in results.items()}

    def fit(
        self,
        global_weights: Weights,
        fl_round: int | None,
        abort_signal: AbortSignal | None,
        global_controls: Weights | None = None,
    ) -> FitResult:
        a = self.args
        load_weights(self.module.net, global_weights)
        if a.tracking:
            self._start_round(fl_round)
        callbacks = []
        if global_controls is not None:
            if self.scaffold is None:
                self.scaffold = ScaffoldSite(self.workdir)
            self.scaffold.start(self.module.net, global_controls)
            callbacks.append(ScaffoldCorrection(self.scaffold))
        if a.fedprox_mu > 0:
            self.module.set_global_weights(global_weights)
        trainer = self._trainer(abort_signal, max_epochs=a.local_epochs, logged=a.tracking, extra=callbacks)
        try:
            trainer.fit(self.module, datamodule=self.data)
        except BaseException:
            if self.scaffold is not None:
                self.scaffold.abort()
            raise
        finally:
            self.module.set_global_weights(None)
        control_diff = self.scaffold.finish(self.module.net) if global_controls is not None else None
        steps = trainer.global_step  # a fresh Trainer starts at 0
        self.logger.advance(steps, a.local_epochs)
        local = {
            k: float(trainer.callback_metrics[k]) for k in ("val_loss", "val_acc") if k in trainer.callback_metrics
        }
        return FitResult(
            weights=numpy_weights(self.module.net),
            samples=self.train_samples * a.local_epochs,
            steps=steps,
            metrics=local,
            control_diff=control_diff,
        )

    # ----- helpers -----------------------------------------------------------------------
    def _start_round(self, fl_round) -> None:
        """The round for the logger's records; the site's params (sent once: the logger skips repeats)."""
        self.logger.round = fl_round
        self.logger.log_hyperparams(self.site_params)

    def _trainer(
        self, abort_signal: AbortSignal | None, max_epochs: int = 1, logged: bool = True, extra: list = ()
    ) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=max_epochs,
            accelerator=self.args.accelerator,
            devices=1,
            logger=self.logger if logged else False,
            callbacks=[AbortOnSignal(abort_signal), *extra],
            log_every_n_steps=self.args.log_every_n_steps,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(self.workdir) if self.workdir else None,
        )
