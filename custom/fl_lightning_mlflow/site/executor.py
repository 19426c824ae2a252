"""The site's FLARE Executor: runs Lightning in the site's own process.

Tasks (the names FLARE's ScatterAndGather and CrossSiteModelEval send):
  train         load the global weights, validate them on the site's validation data
                (returned for server-side model selection), fit `local_epochs`, and return
                the weight difference weighted by the number of training samples seen.
  validate      evaluate the model it is given on the site's validation data.
  submit_model  return the site's best local model so far.

Metrics and hyperparameters stream to the server through FlareLogger; an abort from
FLARE stops the running Trainer at the next batch.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType, LogWriterName
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.app_constant import AppConstants

from fl_lightning_mlflow.site.data import SPLITS_DIR, SiteDataError, SiteDataModule
from fl_lightning_mlflow.site.flare_logger import METRICS_BATCH, PARAMS, FlareLogger
from fl_lightning_mlflow.site.lit_module import OPTIMIZERS, LitCifarNet

STATE_FILE = "site_state.json"  # survives a simulator worker that is restarted between tasks
BEST_MODEL_FILE = "best_local_model.pt"
GLOBAL_PREFIX = "global_"  # metrics of the received global model, before local training
# Read by mlflow_tracking.FederatedMLflowTracker (not imported: sites need no MLflow).
VAL_SAMPLES_META = "val_samples"


class TaskAborted(Exception):
    pass


class AbortOnSignal(pl.Callback):
    """Stops the Trainer at the next batch once FLARE fires the task's abort signal."""

    def __init__(self, abort_signal: Signal):
        self.abort_signal = abort_signal

    def _check(self, *args, **kwargs):
        if self.abort_signal is not None and self.abort_signal.triggered:
            raise TaskAborted()

    on_train_batch_start = _check
    on_validation_batch_start = _check
    on_test_batch_start = _check


def sites_on_this_host(fl_ctx: FLContext) -> int:
    """How many sites share this machine's cores: FL_SITES_PER_HOST if set; in the simulator,
    the number it runs at once (min of -t and the number of clients); otherwise 1."""
    if os.environ.get("FL_SITES_PER_HOST"):
        return max(1, int(os.environ["FL_SITES_PER_HOST"]))
    if not fl_ctx.get_prop(FLContextKey.SIMULATE_MODE, False):
        return 1
    return simulator_concurrency(sys.argv)


def simulator_concurrency(worker_argv) -> int:
    """Read -t and -n/-c from the simulator process that started this worker."""
    try:
        parent = int(worker_argv[worker_argv.index("--parent_pid") + 1])
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
        argv = [a.decode() for a in argv if a]
    except (ValueError, IndexError, OSError):
        return 1

    def opt(*names):
        for i, a in enumerate(argv[:-1]):
            if a in names:
                return argv[i + 1]
        for a in argv:
            for n in names:
                if n.startswith("--") and a.startswith(n + "="):
                    return a.split("=", 1)[1]
        return None

    threads = opt("-t", "--threads")
    n_clients = opt("-n", "--n_clients")
    clients = opt("-c", "--clients")
    n = int(n_clients) if n_clients else (len(clients.split(",")) if clients else 2)
    return max(1, min(int(threads) if threads else 1, n))


def split_params(data_root) -> dict:
    """How the site's share was made (from prepare_data's split_info.json), as params."""
    try:
        info = json.loads((Path(data_root) / SPLITS_DIR / "split_info.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"split": info.get("split"), "alpha": info.get("alpha"), "split_seed": info.get("seed")}


class LightningExecutor(Executor):
    # What the train task reports for the received global model (DXO meta INITIAL_METRICS):
    # the names a server-side model selector's key_metric may use (scripts/check_job.py checks).
    reported_metrics = (f"{GLOBAL_PREFIX}val_acc", f"{GLOBAL_PREFIX}val_loss")
    MAX_LR = 10.0

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
        threads_per_site: int = 0,
        num_workers: int = 0,
        seed: int = 0,
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
    ):
        """Args are set in config_fed_client.json.

        accelerator: "auto" (GPU when one is visible, else CPU), "cpu" or "gpu".
        threads_per_site: torch threads; 0 = usable cores / sites sharing this host.
        tracking: stream metrics and params to the server (false: train without a logger).
        metrics_flush_seconds: send a site's metric records as one FLARE event at most this often
            (FederatedMLflowTracker unpacks them); 0 = one event per log call, which FLARE's stock
            MLflowReceiver also understands.
        """
        super().__init__()
        for name, value in (
            ("local_epochs", local_epochs),
            ("batch_size", batch_size),
            ("log_every_n_steps", log_every_n_steps),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LightningExecutor: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr <= self.MAX_LR:
            raise ValueError(f"LightningExecutor: lr must be a number in (0, {self.MAX_LR}], got {lr!r}")
        for name, value in (("threads_per_site", threads_per_site), ("num_workers", num_workers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LightningExecutor: {name} must be an integer >= 0, got {value!r}")
        if not isinstance(metrics_flush_seconds, (int, float)) or metrics_flush_seconds < 0:
            raise ValueError(f"LightningExecutor: metrics_flush_seconds must be >= 0, got {metrics_flush_seconds!r}")
        if not isinstance(data_root, str) or not data_root:
            raise ValueError(f"LightningExecutor: data_root must be a folder path, got {data_root!r}")
        if accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
            raise ValueError(f"LightningExecutor: accelerator must be auto, cpu or gpu, got {accelerator!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"LightningExecutor: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.data_root = data_root
        self.local_epochs = local_epochs
        self.hparams = dict(lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay)
        self.batch_size = batch_size
        self.log_every_n_steps = log_every_n_steps
        self.tracking = tracking
        self.metrics_flush_seconds = metrics_flush_seconds
        self.accelerator = accelerator
        self.threads_per_site = threads_per_site
        self.num_workers = num_workers
        self.seed = seed
        self.task_names = (train_task_name, validate_task_name, submit_model_task_name)
        self.site = None
        self.module = None
        self.data = None
        self.metrics_logger = None
        self.app_dir = None
        self._fl_ctx = None
        self.best_local_acc = -1.0
        self.setup_error = None

    # ----- lifecycle -------------------------------------------------------------------
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.END_RUN and self.metrics_logger is not None:
            # The sending side's count, to compare with what reaches MLflow.
            self.log_info(fl_ctx, f"{self.site}: sent {self.metrics_logger.points_sent} metric points")
        if event_type == EventType.START_RUN:
            try:
                self._setup(fl_ctx)
            except (SiteDataError, ValueError) as e:
                # Not a system_panic: that stops this site's runner while the server keeps
                # waiting for it. Failing each task instead lets ScatterAndGather decide:
                # carry on if min_clients can still be met, else end the job with this reason.
                self.setup_error = str(e)
                self.log_error(fl_ctx, self.setup_error)

    def _setup(self, fl_ctx: FLContext):
        self.site = fl_ctx.get_identity_name()
        self.app_dir = Path(fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id()))
        threads = self.threads_per_site or max(1, len(os.sched_getaffinity(0)) // sites_on_this_host(fl_ctx))
        torch.set_num_threads(threads)
        pl.seed_everything(self.seed, verbose=False)
        self.data = SiteDataModule(self.data_root, self.site, self.batch_size, self.num_workers)
        self.data.load()  # fail now, with one clear line, rather than mid-round
        self.module = LitCifarNet(**self.hparams)
        self.metrics_logger = FlareLogger(
            self._send_analytics, site=self.site, flush_seconds=self.metrics_flush_seconds
        )
        state = self.app_dir / STATE_FILE
        if state.is_file():
            saved = json.loads(state.read_text())
            self.metrics_logger.step_offset = saved["step_offset"]
            self.metrics_logger.epoch_offset = saved["epoch_offset"]
            self.best_local_acc = saved["best_local_acc"]
        # Sent with the first train task, beside the LightningModule's own hyperparameters.
        self.site_params = dict(
            **split_params(self.data_root),
            site=self.site,
            local_epochs=self.local_epochs,
            train_samples=len(self.data.train_set),
            val_samples=len(self.data.val_set),
            accelerator=self.accelerator,
            torch_threads=threads,
            seed=self.seed,
        )
        self.log_info(
            fl_ctx,
            f"{self.site}: {len(self.data.train_set)} train / {len(self.data.val_set)} val samples "
            f"from {self.data_root}; {threads} torch thread(s); accelerator={self.accelerator}",
        )

    def _save_state(self):
        state = dict(
            step_offset=self.metrics_logger.step_offset,
            epoch_offset=self.metrics_logger.epoch_offset,
            best_local_acc=self.best_local_acc,
        )
        (self.app_dir / STATE_FILE).write_text(json.dumps(state))

    def _send_analytics(self, kind: str, values, step, fl_round):
        kwargs = {"global_step": step} if step is not None else {}
        if fl_round is not None:
            kwargs["round"] = fl_round
        if kind == METRICS_BATCH:  # the records ride in kwargs; value is the last one, for plain receivers
            kwargs["records"] = values
            values = values[-1][2]
        data_type = AnalyticsDataType.PARAMETERS if kind == PARAMS else AnalyticsDataType.METRICS
        dxo = create_analytic_dxo(tag=kind, value=values, data_type=data_type, writer=LogWriterName.MLFLOW, **kwargs)
        send_analytic_dxo(self, dxo=dxo, fl_ctx=self._fl_ctx, event_type=ANALYTIC_EVENT_TYPE)

    def _trainer(self, abort_signal: Signal, max_epochs: int = 1, logger=True) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=max_epochs,
            accelerator=self.accelerator,
            devices=1,
            logger=self.metrics_logger if (logger and self.tracking) else False,
            callbacks=[AbortOnSignal(abort_signal)],
            log_every_n_steps=self.log_every_n_steps,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(self.app_dir),
        )

    # ----- tasks -----------------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.setup_error:
            self.log_error(fl_ctx, f"cannot run {task_name}: {self.setup_error}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        self._fl_ctx = fl_ctx
        train, validate, submit = self.task_names
        try:
            if task_name == train:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == validate:
                return self._validate(shareable, fl_ctx, abort_signal)
            if task_name == submit:
                return self._submit_model(fl_ctx)
            self.log_error(fl_ctx, f"unknown task {task_name!r}; this executor handles {self.task_names}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except TaskAborted:
            self.log_warning(fl_ctx, f"{task_name} aborted")
            return make_reply(ReturnCode.TASK_ABORTED)
        finally:
            self._fl_ctx = None

    def _load_weights(self, shareable: Shareable, fl_ctx: FLContext):
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            raise ValueError(f"expected WEIGHTS, got {dxo.data_kind}")
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in dxo.data.items()}
        self.module.net.load_state_dict(state)

    def _weights(self) -> dict:
        # Copies: .numpy() would share memory with tensors the optimizer then changes in place.
        return {k: v.detach().cpu().numpy().copy() for k, v in self.module.net.state_dict().items()}

    # ----- the training engine: Lightning here; pt_executor.PTExecutor swaps in a plain loop ----
    def start_round(self, fl_round) -> None:
        """Before the round's work: the round for the logger, params once."""
        self.metrics_logger.round = fl_round
        if self.tracking:
            self.metrics_logger.log_hyperparams(self.site_params)

    def evaluate(self, abort_signal: Signal, log_prefix: str | None) -> dict:
        """The current model on the site's validation data; logged under log_prefix unless None."""
        if log_prefix is not None:
            self.metrics_logger.key_prefix = log_prefix
        try:
            trainer = self._trainer(abort_signal, logger=log_prefix is not None)
            (results,) = trainer.validate(self.module, datamodule=self.data, verbose=False)
        finally:
            self.metrics_logger.key_prefix = ""
        return {k: float(v) for k, v in results.items()}

    def fit(self, abort_signal: Signal) -> tuple:
        """local_epochs of training; returns (optimizer steps, local validation accuracy)."""
        trainer = self._trainer(abort_signal, max_epochs=self.local_epochs)
        trainer.fit(self.module, datamodule=self.data)
        steps = trainer.global_step  # a fresh Trainer starts at 0
        self.metrics_logger.advance(steps, self.local_epochs)
        return steps, float(trainer.callback_metrics.get("val_acc", -1.0))

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        fl_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        task_started = time.monotonic()
        self.log_info(fl_ctx, f"round {fl_round}: training starts")
        self._load_weights(shareable, fl_ctx)
        global_weights = self._weights()
        self.start_round(fl_round)

        # 1. The received global model on this site's validation data: selection on the server.
        results = self.evaluate(abort_signal, log_prefix=GLOBAL_PREFIX)
        global_metrics = {f"{GLOBAL_PREFIX}{k}": v for k, v in results.items()}

        # 2. Local training.
        started = time.monotonic()
        steps, local_acc = self.fit(abort_signal)
        if local_acc > self.best_local_acc:
            self.best_local_acc = local_acc
            torch.save(self.module.net.state_dict(), self.app_dir / BEST_MODEL_FILE)
        self._save_state()
        samples = len(self.data.train_set) * self.local_epochs
        self.log_info(
            fl_ctx,
            f"round {fl_round}: global model {GLOBAL_PREFIX}val_acc={global_metrics.get('global_val_acc', 0):.4f}; "
            f"trained {self.local_epochs} epoch(s), {steps} steps in {time.monotonic() - started:.1f} s; "
            f"local val_acc={local_acc:.4f}",
        )

        # 3. The update: weight difference, weighted by samples seen.
        diff = {k: v - global_weights[k] for k, v in self._weights().items()}
        dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data=diff)
        dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, samples)
        dxo.set_meta_prop(MetaKey.INITIAL_METRICS, global_metrics)
        dxo.set_meta_prop(VAL_SAMPLES_META, len(self.data.val_set))  # weights the server's global average
        self.log_info(fl_ctx, f"round {fl_round}: train task took {time.monotonic() - task_started:.2f} s")
        return dxo.to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        model_owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        self._load_weights(shareable, fl_ctx)
        metrics = self.evaluate(abort_signal, log_prefix=None)
        self.log_info(fl_ctx, f"validated model from {model_owner}: {metrics}")
        return DXO(data_kind=DataKind.METRICS, data=metrics).to_shareable()

    def _submit_model(self, fl_ctx: FLContext) -> Shareable:
        path = self.app_dir / BEST_MODEL_FILE
        if not path.is_file():
            self.log_warning(fl_ctx, "no local model trained yet; nothing to submit")
            return make_reply(ReturnCode.EMPTY_RESULT)
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = {k: v.numpy() for k, v in state.items()}
        return DXO(data_kind=DataKind.WEIGHTS, data=weights).to_shareable()
