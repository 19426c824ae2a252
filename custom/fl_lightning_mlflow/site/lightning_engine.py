"""The Lightning engine: a fresh Trainer per task around the user's LightningModule and DataModule.

The module and the DataModule are named in config_fed_client.json (common.class_spec) and built
at setup; extra Trainer arguments pass through (`trainer`), except those the engine owns.

Every self.log(...) of the LightningModule goes to FlareLogger, which puts it on one step axis
per site that never restarts and hands it to the executor's sender (one FLARE event about once
a second). An abort signal stops the running Trainer at the next batch (AbortOnSignal).

Algorithms (site.algorithms), on all the module's parameters, whatever the module is: fedprox_mu > 0
adds the gradient of FedProx's proximal term mu/2 * ||w - w_global||^2 before every optimizer step
(FedProxTerm; logged as train_prox_loss); a task that brings SCAFFOLD's global controls gets the
control correction after every optimizer step (ScaffoldCorrection) and returns the change of the
site's controls with the result.
"""

import difflib
import inspect
import logging
import warnings

import pytorch_lightning as pl
import torch

from fl_lightning_mlflow.common.class_spec import build, check_spec, path_of
from fl_lightning_mlflow.site.algorithms import ScaffoldSite, frozen_parameters
from fl_lightning_mlflow.site.engine import (
    AbortSignal,
    FitResult,
    SiteContext,
    SiteEngine,
    Weights,
    check_abort,
    load_weights,
    numpy_weights,
)
from fl_lightning_mlflow.site.flare_logger import FlareLogger

# Trainer arguments the engine sets itself: a `trainer` entry naming one is refused.
OWNED_TRAINER_ARGS = ("logger", "callbacks", "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time",
                      "devices", "num_nodes", "accelerator", "strategy", "default_root_dir", "enable_checkpointing",
                      "log_every_n_steps")  # fmt: skip


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
        self.scaffold.corrected(pl_module)


class FedProxTerm(pl.Callback):
    """FedProx on any module: before each optimizer step (after AMP's unscaling, before clipping),
    every trainable parameter's gradient gets mu * (w - w_global), the gradient of
    mu/2 * ||w - w_global||^2; the term itself is logged as train_prox_loss."""

    def __init__(self, module: pl.LightningModule, global_weights: Weights, mu: float):
        self.mu = float(mu)
        self.global_params = frozen_parameters(module, global_weights)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        squares = []
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                anchor = self.global_params.get(name)
                if anchor is None:
                    continue
                if anchor.device != p.device:  # Lightning may have moved the model since
                    anchor = self.global_params[name] = anchor.to(p.device)
                delta = p - anchor
                squares.append(torch.sum(delta * delta))
                if p.grad is None:
                    p.grad = self.mu * delta
                else:
                    p.grad.add_(delta, alpha=self.mu)
        if squares:
            pl_module.log("train_prox_loss", 0.5 * self.mu * torch.stack(squares).sum(), on_step=True, on_epoch=True)


class ValidationMetrics(pl.Callback):
    """The metrics the module logs in validation, as of the last validation pass of a fit: the
    names are those that appear (or change) during the first pass, whatever the module calls them."""

    def __init__(self):
        self.names: set = set()
        self._before: dict = {}

    def on_validation_start(self, trainer, pl_module):
        self._before = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def on_validation_end(self, trainer, pl_module):
        now = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.names |= {k for k, v in now.items() if k not in self._before or self._before[k] != v}

    def metrics(self, trainer) -> dict:
        return {k: float(trainer.callback_metrics[k]) for k in sorted(self.names) if k in trainer.callback_metrics}


def _no_send(kind, values, step, fl_round) -> None:
    pass


class LightningEngine(SiteEngine):
    supports_scaffold = True

    def __init__(self, module: dict | object = None, trainer: dict | None = None, metrics_flush_seconds: float = 1.0,
                 **engine_args):  # fmt: skip
        """Args are set in config_fed_client.json (the "engine" component); besides every engine's
        (site.engine.SiteEngine: datamodule, local_epochs, log_every_n_steps, tracking, accelerator,
        seed, fedprox_mu):

        module: the user's LightningModule, {"path": "pkg.mod.Class", "config_type": "dict",
            "args": {...}}; built at setup, after seeding. Its self.log names reach MLflow as
            logged; its validation metrics of the received global model arrive prefixed "global_".
        trainer: extra pytorch_lightning.Trainer arguments, passed through (precision,
            gradient_clip_val, accumulate_grad_batches, deterministic, limit_train_batches, ...);
            those the engine owns (OWNED_TRAINER_ARGS) are refused.
        metrics_flush_seconds: send a site's metric records as one FLARE event at most this often
            (FederatedMLflowTracker unpacks them); 0 = one event per log call, which FLARE's stock
            MLflowReceiver also understands.
        """
        super().__init__(**engine_args)
        owner = type(self).__name__
        check_spec(module, owner, "module")
        self.trainer_args = check_trainer_args(owner, trainer)
        if not isinstance(metrics_flush_seconds, (int, float)) or isinstance(metrics_flush_seconds, bool):
            metrics_flush_seconds = -1
        if metrics_flush_seconds < 0:
            raise ValueError(f"{owner}: metrics_flush_seconds must be a number >= 0, got {metrics_flush_seconds!r}")
        self.module_spec = module
        self.metrics_flush_seconds = metrics_flush_seconds
        self.module = self.logger = None
        self.workdir = self.site_root = None
        self.site_params = {}
        self.scaffold: ScaffoldSite | None = None  # built at the first SCAFFOLD task

    # ----- SiteEngine --------------------------------------------------------------------
    def setup(self, ctx: SiteContext) -> None:
        a = self.args
        torch.set_num_threads(ctx.threads)
        # Seeded before anything is built: the same seed gives the same run.
        pl.seed_everything(a.seed, verbose=False)
        self._setup_data(ctx.site)
        module = build(self.module_spec, type(self).__name__, "module")
        if not isinstance(module, pl.LightningModule):
            raise ValueError(f"{type(self).__name__}: module {path_of(self.module_spec)} is not a LightningModule")
        self.module = module
        # Always built (it carries the step axis); attached to Trainers only when tracking.
        self.logger = FlareLogger(ctx.send or _no_send, site=ctx.site, flush_seconds=self.metrics_flush_seconds)
        self.workdir, self.site_root = ctx.workdir, ctx.site_root
        # Sent with the first round, beside the LightningModule's and the DataModule's own
        # hyperparameters, which every Trainer logs.
        self.site_params = self._site_params(ctx.threads)

    def describe(self) -> str:
        return f"{path_of(self.module_spec)} on {path_of(self.args.datamodule)}; accelerator={self.args.accelerator}"

    @property
    def points_sent(self) -> int:
        return self.logger.points_sent if self.logger is not None else 0

    def flush(self) -> None:
        if self.logger is not None:
            self.logger.flush()

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
        load_weights(self.module, weights)
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
        load_weights(self.module, global_weights)
        if a.tracking:
            self._start_round(fl_round)
        validation = ValidationMetrics()
        callbacks = [validation]
        if global_controls is not None:
            if self.scaffold is None:
                self.scaffold = ScaffoldSite(self.workdir, self.site_root)
            self.scaffold.start(self.module, global_controls)
            callbacks.append(ScaffoldCorrection(self.scaffold))
        if a.fedprox_mu > 0:
            callbacks.append(FedProxTerm(self.module, global_weights, a.fedprox_mu))
        trainer = self._trainer(abort_signal, max_epochs=a.local_epochs, logged=a.tracking, extra=callbacks)
        try:
            trainer.fit(self.module, datamodule=self.data)
        except BaseException:
            if self.scaffold is not None:
                self.scaffold.abort()
            raise
        control_diff = self.scaffold.finish(self.module) if global_controls is not None else None
        steps = trainer.global_step  # a fresh Trainer starts at 0
        self.logger.advance(steps, a.local_epochs)
        return FitResult(
            weights=numpy_weights(self.module),
            samples=self.train_samples * a.local_epochs,
            steps=steps,
            metrics=validation.metrics(trainer),
            control_diff=control_diff,
        )

    def dry_validation(self, weights: Weights | None = None) -> set | str:
        """For flctl check, after _setup_data: the names the module logs in validation, from one
        batch (with weights loaded, e.g. the server's initial model), or why it could not run. A module
        that does not build raises its one-line ValueError."""
        module = build(self.module_spec, type(self).__name__, "module")  # a SpecError is the caller's line
        try:
            if weights is not None:
                load_weights(module, weights)
            logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # a check: no Trainer chatter
            quiet = dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
            with warnings.catch_warnings():  # Lightning's own deprecation notes are not the user's problem
                warnings.simplefilter("ignore")
                trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, limit_val_batches=1, **quiet)
                (results,) = trainer.validate(module, datamodule=self.data, verbose=False)
        except Exception as e:  # noqa: BLE001 - the user's code: whatever it raises is the finding
            return f"{type(e).__name__}: {str(e)[:300]}"
        if not results:
            return "the module logs nothing in validation_step (self.log), so no global model can be selected"
        return set(results)

    # ----- helpers -----------------------------------------------------------------------
    def _start_round(self, fl_round) -> None:
        """The round for the logger's records; the site's params (sent once: the logger skips repeats)."""
        self.logger.round = fl_round
        self.logger.log_hyperparams(self.site_params)

    def _trainer(
        self, abort_signal: AbortSignal | None, max_epochs: int = 1, logged: bool = True, extra: list = ()
    ) -> pl.Trainer:
        quiet = {"num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False}
        return pl.Trainer(
            **{**quiet, **self.trainer_args},
            max_epochs=max_epochs,
            accelerator=self.args.accelerator,
            devices=1,
            logger=self.logger if logged else False,
            callbacks=[AbortOnSignal(abort_signal), *extra],
            log_every_n_steps=self.args.log_every_n_steps,
            enable_checkpointing=False,
            default_root_dir=str(self.workdir) if self.workdir else None,
        )


def check_trainer_args(owner: str, trainer) -> dict:
    """The pass-through Trainer arguments, each one pl.Trainer takes and the engine does not own."""
    if trainer is None:
        return {}
    if not isinstance(trainer, dict):
        raise ValueError(f"{owner}: trainer must be an object of Trainer arguments, got {trainer!r}")
    takes = [n for n in inspect.signature(pl.Trainer).parameters if n != "self"]
    for name in trainer:
        if name in OWNED_TRAINER_ARGS:
            raise ValueError(f"{owner}: trainer.{name} is set by the engine (see the engine's own arguments)")
        if name not in takes:
            close = difflib.get_close_matches(name, takes, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{owner}: trainer.{name} is not a pytorch_lightning.Trainer argument{hint}")
    return dict(trainer)
