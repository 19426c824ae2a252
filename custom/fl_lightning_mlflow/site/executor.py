"""The site's FLARE Executor: maps FLARE's tasks onto a training engine (site.engine.SiteEngine).

Tasks (the names FLARE's ScatterAndGather and CrossSiteModelEval send; configurable):
  train         evaluate the received global weights on the site's validation data (returned
                for server-side model selection), fit from them, and return the weight
                difference weighted by the number of training samples seen; a SCAFFOLD task is
                answered in the form it came in (site.task_forms). The meta this executor adds is
                on the outer DXO, where the model selector and the tracker read it.
  validate      evaluate the weights it is given on the site's validation data.
  submit_model  return the site's best local model so far (by key_metric, in key_metric_mode).

The engine is a component of config_fed_client.json named by `engine_id` (FLARE's learner
pattern, as ModelLearnerExecutor's learner_id): site.lightning_engine.LightningEngine or
site.pt_engine.PTEngine. The executor owns the FLARE side of the tasks: Shareable/DXO conversion,
the abort signal, the best-local-model file, thread sizing (site.threads) and setup errors, which
fail each task with one line rather than panicking the site. What streams to the server (events,
sent counts, the dataset description, system metrics, the state file) is site.telemetry's.

Delivery accounting: everything the engine hands on for the server is counted, and the train,
validate and submit_model results carry the cumulative counts as DXO meta SENT_COUNTS_META, after
flushing the engine so nothing counted is still waiting on the site. The task result is the
reliable channel (events are best effort), so the server learns what was sent even when events
were lost. Points sent after a site's last task result are in no result; the END_RUN log lines
count them. Beside them, HELD_COUNTS_META: what the site's outbound gate held back (site.outbound).

The site's disclosure policy (site.disclosure_policy) is read from the site's own local/ folder
at START_RUN, never from the job's configuration. It governs what streams (site.telemetry) and
also the metrics a task result carries for the server's model selection and cross-site matrix:
the site decides what of its measurements leaves, whichever way.
"""

import os
import time
from pathlib import Path

import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fl_lightning_mlflow.common.protocol import (
    GLOBAL_PREFIX,
    HELD_COUNTS_META,
    SCAFFOLD_LINEAGE_HEADER,
    SENT_COUNTS_META,
    SITE_STATE_ENV,
    VAL_SAMPLES_META,
)
from fl_lightning_mlflow.site.engine import SiteContext, SiteEngine, TaskAborted, is_int
from fl_lightning_mlflow.site.system_sampler import check_interval
from fl_lightning_mlflow.site.task_forms import TrainTask, weights_of
from fl_lightning_mlflow.site.telemetry import SiteTelemetry
from fl_lightning_mlflow.site.threads import torch_threads

BEST_MODEL_FILE = "best_local_model.pt"


def shown(metrics: dict, prefix: str = "") -> str:
    """Metrics for a log line: name=value, a few at most."""
    parts = [f"{prefix}{k}={v:.4f}" for k, v in sorted(metrics.items())[:4] if isinstance(v, (int, float))]
    return ", ".join(parts) or "(no metrics)"


def with_sent_counts(dxo: DXO, counts: dict, held: dict | None = None) -> DXO:
    """The task result's DXO with the site's cumulative sent counts ({kind: n}) in its meta, and
    what its outbound gate held back ({column: {kind: n}})."""
    dxo.set_meta_prop(SENT_COUNTS_META, dict(counts))
    if held is not None:
        dxo.set_meta_prop(HELD_COUNTS_META, {column: dict(kinds) for column, kinds in held.items()})
    return dxo


def end_of_run_lines(site: str, engine: SiteEngine, telemetry: SiteTelemetry) -> list:
    """The site's END_RUN log lines: what it sent (and held back), as the sending side counts it."""
    # The sending side's count, to compare with what reaches MLflow (this process's).
    lines = [f"{site}: sent {engine.points_sent} metric points"]
    if telemetry.sampler is not None:  # apart: the last samples may leave as the server stops listening
        lines.append(f"{site}: sent {telemetry.sampler.points_sent} system metric points")
    # The cumulative counts again: they include what was sent after the last task result,
    # which the server never hears of otherwise (no task result follows END_RUN).
    lines.append(f"{site}: sent counts at job end {telemetry.sent.snapshot()}, held back {telemetry.gate.snapshot()}")
    return lines


def with_counts(dxo: DXO, telemetry: SiteTelemetry) -> DXO:
    """A task result's DXO with the site's sent and held counts (the reliable channel: module docstring)."""
    return with_sent_counts(dxo, telemetry.sent.snapshot(), telemetry.gate.snapshot())


def best_so_far(metrics: dict, key_metric: str, mode: str, best) -> tuple:
    """(whether this model is the best so far, the best key metric value now). No key metric: the
    last model is the best; a model whose key metric was not measured counts only while none was."""
    if not key_metric:
        return True, best
    value = metrics.get(key_metric)
    if not isinstance(value, (int, float)) or value != value:
        return best is None, best
    if best is None or (value < best if mode == "min" else value > best):
        return True, value
    return False, best


def check_args(engine_id, threads_per_site, tasks: dict, key_metric, key_metric_mode) -> None:
    """SiteExecutor's arguments, one ValueError line for the first bad one."""
    if not isinstance(engine_id, str) or not engine_id:
        raise ValueError(f"SiteExecutor: engine_id must be a component id, got {engine_id!r}")
    if not is_int(threads_per_site) or threads_per_site < 0:
        raise ValueError(f"SiteExecutor: threads_per_site must be an integer >= 0, got {threads_per_site!r}")
    for name, value in tasks.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"SiteExecutor: {name} must be a task name, got {value!r}")
    if not isinstance(key_metric, str):
        raise ValueError(f'SiteExecutor: key_metric must be a metric name or "", got {key_metric!r}')
    if key_metric_mode not in ("max", "min"):
        raise ValueError(f'SiteExecutor: key_metric_mode must be "max" or "min", got {key_metric_mode!r}')


def site_state_root(site: str, engine) -> Path:
    """Where this site keeps what outlives a job: its workspace, or its folder under SITE_STATE_ENV."""
    shared = os.environ.get(SITE_STATE_ENV)
    return Path(shared) / site if shared else Path(engine.get_workspace().get_root_dir())


class SiteExecutor(Executor):
    def __init__(
        self,
        engine_id: str = "engine",
        threads_per_site: int = 0,
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
        system_metrics_seconds: float = 10.0,
        key_metric: str = "",
        key_metric_mode: str = "max",
        stream_budget: dict | None = None,
    ):
        """Args are set in config_fed_client.json.

        engine_id: the id of the training engine component (a site.engine.SiteEngine).
        threads_per_site: torch threads; 0 = usable cores / sites sharing this host (site.threads).
        system_metrics_seconds: sample CPU, memory and GPU use this often and stream it to the
            site's run under MLflow's system/ names (site.system_sampler); 0 = off.
        key_metric, key_metric_mode: the module's validation metric ("val_acc") that picks the
            site's best local model (the one submit_model returns), and whether higher ("max") or
            lower ("min") is better; "" = the last local model.
        stream_budget: what the site may stream (common.stream_budget; None: the default, {}: none).
        """
        super().__init__()
        tasks = {"train_task_name": train_task_name, "validate_task_name": validate_task_name,
                 "submit_model_task_name": submit_model_task_name}  # fmt: skip
        check_args(engine_id, threads_per_site, tasks, key_metric, key_metric_mode)
        self.key_metric, self.key_metric_mode = key_metric, key_metric_mode
        self.telemetry = SiteTelemetry(self, check_interval("SiteExecutor", system_metrics_seconds), stream_budget)
        self.engine_id = engine_id
        self.threads_per_site = threads_per_site
        self.task_names = (train_task_name, validate_task_name, submit_model_task_name)
        self.engine: SiteEngine | None = None
        self.site = None
        self.app_dir = None
        self.best_local = None  # the best local model's key metric so far (None: none yet)
        self.setup_error = None

    # ----- lifecycle -------------------------------------------------------------------
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            try:
                self._setup(fl_ctx)
            except ValueError as e:  # SiteDataError is one too
                # Not a system_panic: that stops this site's runner while the server keeps
                # waiting for it. Failing each task instead lets ScatterAndGather decide:
                # carry on if min_clients can still be met, else end the job with this reason.
                self.setup_error = str(e)
                self.log_error(fl_ctx, self.setup_error)
            else:
                self._start_sampler(fl_ctx)
        elif event_type == EventType.END_RUN and self.telemetry.stop_sampler():
            self._save_state()  # the sample index, for a restarted process
        if event_type == EventType.END_RUN and self.engine is not None and not self.setup_error:
            for line in end_of_run_lines(self.site, self.engine, self.telemetry):
                self.log_info(fl_ctx, line)

    def _setup(self, fl_ctx: FLContext):
        self.site = fl_ctx.get_identity_name()
        engine = fl_ctx.get_engine()
        self.app_dir = Path(engine.get_workspace().get_app_dir(fl_ctx.get_job_id()))
        training = engine.get_component(self.engine_id)
        if not isinstance(training, SiteEngine):
            found = "nothing" if training is None else type(training).__name__
            raise ValueError(
                f"SiteExecutor: engine_id {self.engine_id!r} must name a training engine component "
                f"(a site.engine.SiteEngine) in config_fed_client.json, found {found}"
            )
        writer = None
        if training.writer_id:
            writer = engine.get_component(training.writer_id)
            if writer is None:
                raise ValueError(f"no component {training.writer_id!r} (an MLflowWriter) in config_fed_client.json")
        simulate = bool(fl_ctx.get_prop(FLContextKey.SIMULATE_MODE, False))
        threads = torch_threads(self.threads_per_site, simulate)
        # From the site's own local/ folder, said once in its log; a bad file fails setup (ValueError).
        self.log_info(fl_ctx, self.telemetry.load_policy(engine.get_workspace().get_site_config_dir(), self.site))
        saved = SiteTelemetry.saved(self.app_dir)
        self.telemetry.resume(saved)  # a restarted process carries on counting where the last one saved
        if writer is not None:
            writer = self.telemetry.writer(writer)
        root = site_state_root(self.site, engine)
        context = SiteContext(self.site, self.app_dir, threads, self.telemetry.sender(), writer, root)
        training.setup(context)
        self.engine = training
        self.telemetry.val_samples(training.val_samples)  # the policy's min_validation_samples needs it
        if saved:
            self.engine.load_state_dict(saved.get("engine", {}))
            self.best_local = saved.get("best_local")
        self.log_info(
            fl_ctx,
            f"{self.site}: {training.train_samples} train / {training.val_samples} val samples "
            f"{training.describe()}; {threads} torch thread(s)",
        )

    def _start_sampler(self, fl_ctx: FLContext) -> None:
        if self.engine.tracking:  # an engine that streams nothing (tracking=false) gets no system metrics either
            saved = SiteTelemetry.saved(self.app_dir).get("system_step", 0)
            self.telemetry.start_sampler(fl_ctx.get_engine(), saved, self.logger.warning)

    def _save_state(self) -> None:
        self.telemetry.save(self.app_dir, engine=self.engine.state_dict(), best_local=self.best_local)

    # ----- tasks -----------------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.setup_error or self.engine is None:
            self.log_error(fl_ctx, f"cannot run {task_name}: {self.setup_error or 'the site was not set up'}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        self.telemetry.fl_ctx = fl_ctx  # the analytics sender fires events in the running task's context
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
            self.telemetry.fl_ctx = None

    def _better_local(self, metrics: dict) -> bool:
        """Whether this local model is the site's best so far (and remember its key metric)."""
        better, self.best_local = best_so_far(metrics, self.key_metric, self.key_metric_mode, self.best_local)
        return better

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        fl_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        task_started = time.monotonic()
        self.log_info(fl_ctx, f"round {fl_round}: training starts")
        # SCAFFOLD: the run's lineage and the round say where this site's own controls belong.
        task = TrainTask.of(from_shareable(shareable), shareable.get_header(SCAFFOLD_LINEAGE_HEADER), fl_round)
        global_weights = task.weights
        self.telemetry.announce_policy(self.engine)
        self.telemetry.send_datasets(self.engine)
        if task.controls is not None and not self.engine.supports_scaffold:
            self.log_error(
                fl_ctx,
                f"round {fl_round}: the server runs SCAFFOLD, which {type(self.engine).__name__} does not support; "
                "use LightningEngine or PTEngine, or a FedAvg workflow",
            )
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

        # 1. The received global model on this site's validation data: selection on the server.
        results = self.engine.evaluate(global_weights, abort_signal, fl_round=fl_round, log_prefix=GLOBAL_PREFIX)
        # What leaves in the result passes the site's gate too (the model selector reads these).
        global_metrics = self.telemetry.gate.result_metrics({f"{GLOBAL_PREFIX}{k}": v for k, v in results.items()})

        # 2. Local training, from the global weights.
        started = time.monotonic()
        if task.controls is None:
            fit = self.engine.fit(global_weights, fl_round, abort_signal)
        else:
            fit = self.engine.fit(global_weights, fl_round, abort_signal, global_controls=task.controls)
        if self._better_local(fit.metrics):
            torch.save({k: torch.as_tensor(v) for k, v in fit.weights.items()}, self.app_dir / BEST_MODEL_FILE)
        self.engine.flush()  # before counting (FlareLogger holds records up to 1 s): the result reports all sent
        self._save_state()
        self.log_info(
            fl_ctx,
            f"round {fl_round}: global model {shown(results, GLOBAL_PREFIX)}; "
            f"trained {fit.samples} samples, {fit.steps} steps in {time.monotonic() - started:.1f} s; "
            f"local {shown(fit.metrics)}",
        )

        # 3. The update: weight difference, weighted by samples seen.
        # In the model's dtype, as the engine loaded them: the difference is what training changed.
        diff = {k: v - global_weights[k].astype(v.dtype, copy=False) for k, v in fit.weights.items()}
        dxo = task.result(DXO(data_kind=DataKind.WEIGHT_DIFF, data=diff), fit)
        dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, fit.samples)
        dxo.set_meta_prop(MetaKey.INITIAL_METRICS, global_metrics)
        dxo.set_meta_prop(VAL_SAMPLES_META, self.engine.val_samples)  # weights the server's global average
        with_counts(dxo, self.telemetry)
        self.log_info(fl_ctx, f"round {fl_round}: train task took {time.monotonic() - task_started:.2f} s")
        return dxo.to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        model_owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        self.telemetry.announce_policy(self.engine)
        metrics = self.engine.evaluate(weights_of(from_shareable(shareable)), abort_signal)
        self.log_info(fl_ctx, f"validated model from {model_owner}: {metrics}")
        self.engine.flush()
        metrics = self.telemetry.gate.result_metrics(metrics)  # the cross-site matrix: what the site lets out
        return with_counts(DXO(data_kind=DataKind.METRICS, data=metrics), self.telemetry).to_shareable()

    def _submit_model(self, fl_ctx: FLContext) -> Shareable:
        path = self.app_dir / BEST_MODEL_FILE
        if not path.is_file():
            self.log_warning(fl_ctx, "no local model trained yet; nothing to submit")
            return make_reply(ReturnCode.EMPTY_RESULT)
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = {k: v.numpy() for k, v in state.items()}
        # Cross-site evaluation asks for this after the last round: one more, later, report of the counts.
        self.engine.flush()
        return with_counts(DXO(data_kind=DataKind.WEIGHTS, data=weights), self.telemetry).to_shareable()
