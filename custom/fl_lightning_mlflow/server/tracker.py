"""FederatedMLflowTracker: the FLARE component that tracks a federated job in MLflow.

A subclass of FLARE's MLflowReceiver (same constructor arguments: tracking_uri, kw_args with
experiment_name, run_name, experiment_tags, run_tags; events), so job configs wire it where the
stock receiver would go; it replaces the receiver's write path. This module is glue only: it
turns FLARE events into calls of the rooms that do the work, none of which knows FLARE:
  - records.RecordChecker: what sites stream, checked and bounded;
  - summary.FederationSummary: per-round global metrics (weighted as the model selector
    weighs), best model, cross-site matrix, final status;
  - delivery.DeliveryLedger: what each site says it sent (its task results' SENT_COUNTS_META)
    against what was received and what MLflow wrote or refused, per site, at the end;
  - mlflow_sink.MLflowSink: the run tree, models and stats file, written off FLARE's threads;
  - tracking_uri: URI checks and the start-of-job credential probe.
"""

import threading
import time

import numpy as np
from nvflare.apis.analytix import AnalyticsData, LogWriterName
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

from fl_lightning_mlflow.common.protocol import (
    CROSS_SITE_MODELS_PROP,
    CROSS_SITE_MODELS_TAG,
    HELD_COUNTS_META,
    SENT_COUNTS_META,
)
from fl_lightning_mlflow.server.continuation import Continuation
from fl_lightning_mlflow.server.delivery import DeliveryLedger
from fl_lightning_mlflow.server.job_end import end_job
from fl_lightning_mlflow.server.job_start import recover_earlier_jobs, start_job
from fl_lightning_mlflow.server.mlflow_sink import PARENT, MLflowSink
from fl_lightning_mlflow.server.model_logger import ModelLogger
from fl_lightning_mlflow.server.model_policy import ModelPolicy, queue_round_model
from fl_lightning_mlflow.server.records import RecordChecker
from fl_lightning_mlflow.server.round_timings import RoundTimings, update_bytes
from fl_lightning_mlflow.server.site_stream import SiteStream
from fl_lightning_mlflow.server.summary import FederationSummary
from fl_lightning_mlflow.server.tracking_uri import TrackingConfigError, check_server, check_tracking_uri


class FederatedMLflowTracker(MLflowReceiver):
    def __init__(self, tracking_uri: str | None = None, kw_args: dict | None = None,
                 artifact_location: str | None = None, events: list | None = None,
                 buffer_flush_time: float | None = None, writers: int | None = None,
                 registered_model_name: str = "", persistor_id: str = "persistor", metric_modes: dict | None = None,
                 fl_params: dict | None = None, promote_params: list | None = None, description: str = "",
                 max_memory_items: int = 200_000, retry_initial: float = 0.5, retry_max: float = 15.0,
                 final_flush_timeout: float = 120.0, http_request_max_retries: int = 2, http_request_timeout: int = 10,
                 model_selector_id: str = "model_selector", journal_sync_seconds: float = 1.0,
                 recover_orphans: bool = True, log_models: str = "best_and_final",
                 resume_from: dict | None = None, site_budget: dict | None = None):  # fmt: skip
        """Args are set in config_fed_server.json.

        tracking_uri: None or "" = sqlite mlflow.db in the server's job workspace; or
            sqlite:////abs.db, http://host:port. Credentials come from MLFLOW_TRACKING_USERNAME/
            PASSWORD (or _TOKEN) in the server's environment.
        kw_args: as MLflowReceiver: experiment_name, run_name (the parent run; default: the job
            name), experiment_tags, run_tags (on every run).
        artifact_location: as MLflowReceiver: where a new experiment keeps its artifacts, a URI or
            a path (a relative path is under the job's run folder, as FLARE's receiver has it);
            None: beside the SQLite store, or the tracking server's default. An existing
            experiment keeps its own (said in one line when it differs).
        buffer_flush_time: MLflowReceiver's flush interval, accepted so its configs build; this
            tracker has none to set (its queue writes as fast as MLflow takes it), which it says once.
        registered_model_name: Model Registry name for the best global model ("" = experiment name).
        persistor_id: the model persistor whose model (the user's module, server.initial_model) the
            logged global models are copies of.
        metric_modes: {global metric name: "max" or "min"} for metrics besides the selector's
            key_metric (whose mode is the selector's key_metric_mode) that get a worst_site.
        fl_params: FL configuration logged as params of the parent run.
        promote_params: site params also logged once on the parent (e.g. local_epochs, split).
        description: the experiment's description in the MLflow UI (set as mlflow.note.content
            in code: a dotted key in the JSON would be mangled by `nvflare job submit`).
        final_flush_timeout: at job end, how long to keep retrying unwritten data.
        http_request_*: defaults for MLflow's own HTTP retries, applied only where the
            environment does not set MLFLOW_HTTP_REQUEST_MAX_RETRIES/TIMEOUT; our queue retries
            beyond that without holding anything else up.
        model_selector_id: the IntimeModelSelector whose weights the per-round means use.
        journal_sync_seconds: how often the journal of accepted records is fsynced (a crash of
            the machine loses at most this window; a crash of the FL server process, nothing).
        recover_orphans: at job start, recover (in the background) the tracking of earlier jobs
            on this FL server whose process died (their journals in the server's workspace).
        log_models: which rounds' global models become MLflow LoggedModels (server.model_policy):
            "best_and_final" (default), "every_round" or "every_k:<k>"; the best and the final are
            always logged, and registered with the aliases champion and final.
        writers: MLflow requests out at once, each for another run (None: 4 to a tracking server, 1 to SQLite).
        site_budget: what one site may stream (common.stream_budget): {"points_per_second": r,
            "burst": b}; None: the default, {}: no budget. Points over it are counted as throttled.
        resume_from: set by flctl in a continuation job only: the dead job's plan
            (server.continuation): its runs go on instead of new ones being created.
        """
        super().__init__(tracking_uri=tracking_uri or None, kw_args=kw_args, events=events)
        if artifact_location is not None and (not isinstance(artifact_location, str) or not artifact_location):
            raise TrackingConfigError(f"artifact_location must be a path or URI, got {artifact_location!r}")
        self.requested_artifacts = artifact_location
        if buffer_flush_time is not None:
            if not isinstance(buffer_flush_time, (int, float)) or isinstance(buffer_flush_time, bool):
                raise TrackingConfigError(f"buffer_flush_time must be a number of seconds, got {buffer_flush_time!r}")
            self.logger.info(
                f"buffer_flush_time={buffer_flush_time} (MLflowReceiver's flush interval) has nothing to set here: "
                "this tracker's write queue sends what it holds as soon as MLflow has taken the last request"
            )
        self.experiment_name = self.kw_args.get("experiment_name") or "hello-lightning-mlflow"
        if tracking_uri:
            check_tracking_uri(tracking_uri)
        for key in ("experiment_tags", "run_tags"):
            if not isinstance(self.kw_args.get(key, {}), dict):
                raise TrackingConfigError(f"kw_args.{key} must be an object of tag names to values")
        self.models = ModelLogger(None, registered_model_name or self.experiment_name)
        self.persistor_id = persistor_id
        self.metric_modes = dict(metric_modes or {})
        bad = {k: v for k, v in self.metric_modes.items() if v not in ("max", "min")}
        if bad:
            raise TrackingConfigError(f'metric_modes must map metric names to "max" or "min", got {bad}')
        self.key_metric_mode, self.key_metric_name = "max", None
        self.model_policy = ModelPolicy.parse(log_models)
        self.round_timings = RoundTimings()
        self.round_weights = None  # (round, a copy of the global weights the sites received in it)
        self.fl_params = fl_params or {}
        self.promote_params = list(promote_params or [])
        self.description = description
        if not (isinstance(journal_sync_seconds, (int, float)) and 0 < journal_sync_seconds <= 60):
            raise TrackingConfigError(f"journal_sync_seconds must be in (0, 60], got {journal_sync_seconds!r}")
        self.queue_args = {"max_memory_items": max_memory_items, "retry_initial": retry_initial, "retry_max": retry_max,
                           "sync_seconds": float(journal_sync_seconds), "writers": writers}  # fmt: skip
        self.recover_orphans = recover_orphans
        self.final_flush_timeout = final_flush_timeout
        self.http_defaults = {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(http_request_max_retries),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(http_request_timeout),
        }
        self.model_selector_id = model_selector_id
        self.continuation = Continuation(resume_from) if resume_from else None
        # Problems go to the log without firing FLARE log events from inside an event handler.
        self.records = RecordChecker(warn=self.logger.warning)
        self.stream = SiteStream(self.records, site_budget, warn=self.logger.warning)
        self.stream.continuation = self.continuation
        self.summary = FederationSummary()
        self.delivery = DeliveryLedger()
        self.sink: MLflowSink | None = None
        self.app_dir = None
        # Our own lifecycle (not the base class's private flags): events are tracked between a
        # successful initialize() and finalize().
        self.tracking = False
        self._lock = threading.Lock()  # FLARE fires events from several threads
        self.timings = {"max_event_seconds": 0.0, "probe_seconds": 0.0, "slowest_event": None}

    # ----- event dispatch, timed: nothing here may wait on MLflow ---------------------------
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN and not self._tracking_server_accepts(fl_ctx):
            return  # not initialized: nothing is tracked, and the job is being stopped
        started = time.perf_counter()
        if self.tracking:
            with self._lock:
                self._handle_fl_event(event_type, fl_ctx)
        super().handle_event(event_type, fl_ctx)
        if event_type != EventType.END_RUN:  # END_RUN flushes on purpose
            elapsed = time.perf_counter() - started
            if elapsed > self.timings["max_event_seconds"]:
                self.timings.update(max_event_seconds=elapsed, slowest_event=event_type)

    def _handle_fl_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.BEFORE_PROCESS_SUBMISSION:  # every task result, late ones too
            counts = sent_counts_of(fl_ctx)
            if counts:
                self.delivery.report(*counts[:2])
                if counts[2] is not None:  # what the site's own rules held back (its policy)
                    self.delivery.report_held(counts[0], counts[2])
        elif event_type == AppEventType.ROUND_STARTED:
            self.summary.num_rounds = fl_ctx.get_prop(AppConstants.NUM_ROUNDS, self.summary.num_rounds)
            if self.continuation:
                self.continuation.round_started(self.summary)
            self.round_timings.start()
            fl_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            # A copy: the shareable generator updates the global weights in place after aggregation.
            logged = self.model_policy.logs_round(fl_round)
            self.round_weights = (fl_round, global_weights_of(fl_ctx)) if logged else None
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            contribution = contribution_of(fl_ctx)
            if contribution:
                self.summary.add_contribution(*contribution)
            self.round_timings.accepted(update_size_of(fl_ctx))
        elif event_type == AppEventType.ROUND_DONE:
            fl_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            points = self.summary.close_round(fl_round) + self.round_timings.done()
            self.sink.metrics(PARENT, points, _now(), step=fl_round)
            self.sink.round_done(fl_round)  # in the journal's state: recovery names the last completed round
            self.round_weights = queue_round_model(self.sink, self.round_weights, fl_round, self.logger)
        elif event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            value = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
            if self.key_metric_mode == "min" and isinstance(value, (int, float)):
                value = -value  # the selector negates a lower-is-better metric to maximise it
            self.summary.set_best(fl_ctx.get_prop(AppConstants.CURRENT_ROUND), value)
        elif event_type == AppEventType.CROSS_VAL_INIT:  # what it will cover (server.cross_site_eval)
            record_cross_site_models(self, fl_ctx.get_prop(CROSS_SITE_MODELS_PROP))
        elif event_type == AppEventType.VALIDATION_RESULT_RECEIVED:
            result = cross_site_result_of(fl_ctx)
            if result:
                self.summary.add_cross_site(*result)
        elif event_type == EventType.FATAL_SYSTEM_ERROR:
            self.summary.fail(fl_ctx.get_prop(FLContextKey.EVENT_DATA, "fatal system error"))

    # ----- start ----------------------------------------------------------------------------
    def _tracking_server_accepts(self, fl_ctx: FLContext) -> bool:
        started = time.perf_counter()
        verdict, message = check_server(self.tracking_uri or "")
        self.timings["probe_seconds"] = time.perf_counter() - started
        if verdict == "refused":
            self.system_panic(message, fl_ctx)  # FLARE logs the reason, once, and stops the job
            return False
        if verdict == "unreachable":
            self.log_warning(fl_ctx, message)
        return True

    def initialize(self, fl_ctx: FLContext):
        start_job(self, fl_ctx)  # server.job_start: the sink, the run tree, the summary's weights
        self.tracking = True

    def _recover(self, server_workspace, own_run_dir) -> None:
        recover_earlier_jobs(self.logger, server_workspace, own_run_dir)  # server.job_start starts it in a thread

    # ----- streamed site data (called by the base class under its save lock) --------------------
    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str):
        site = record_origin
        try:
            data = AnalyticsData.from_dxo(from_shareable(shareable), receiver=LogWriterName.MLFLOW)
        except (TypeError, ValueError, KeyError) as e:  # FLARE's own checks of what a site sent
            self.records.reject(site, "event", None, f"is malformed ({type(e).__name__}: {str(e)[:200]})")
            return
        if data is None or not self.tracking:
            return
        self.stream.take(site, data)

    # ----- end ----------------------------------------------------------------------------------
    def finalize(self, fl_ctx: FLContext):
        with self._lock:
            self.tracking = False
        end_job(self, fl_ctx)


def record_cross_site_models(tracker, models) -> None:
    """The parent run records what cross-site evaluation covers: a tag (also when nothing is
    evaluated) and a column of its cross-site table. FLARE's own workflow says nothing."""
    if isinstance(models, str) and models:
        tracker.summary.cross_site_models = models
        tracker.sink.tags(PARENT, [(CROSS_SITE_MODELS_TAG, models)])


def _now() -> int:
    return int(time.time() * 1000)


def contribution_of(fl_ctx: FLContext) -> tuple | None:
    """A site's train result as the aggregator is about to see it: (site, its round, the received
    global model's metrics, the selector's step count, the current round), or None."""
    peer_ctx = fl_ctx.get_peer_context()
    shareable = peer_ctx.get_prop(FLContextKey.SHAREABLE) if peer_ctx else None
    if shareable is None:
        return None
    try:
        dxo = from_shareable(shareable)
    except ValueError:
        return None
    return (
        peer_ctx.get_identity_name(default="?"),
        shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND),
        dxo.get_meta_prop(MetaKey.INITIAL_METRICS),
        dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 1.0),  # read as the model selector reads it
        fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
    )


def global_weights_of(fl_ctx: FLContext) -> dict | None:
    """A copy of the global model's weights ({name: array}) in the workflow's context, or None."""
    learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
    weights = learnable.get(ModelLearnableKey.WEIGHTS) if isinstance(learnable, dict) else None
    if not isinstance(weights, dict) or not weights:
        return None
    return {k: np.array(v, copy=True) for k, v in weights.items()}


def update_size_of(fl_ctx: FLContext) -> int:
    """The bytes of the update in the train result being accepted (0 if there is none)."""
    peer_ctx = fl_ctx.get_peer_context()
    shareable = peer_ctx.get_prop(FLContextKey.SHAREABLE) if peer_ctx else None
    try:
        return update_bytes(from_shareable(shareable)) if shareable is not None else 0
    except (ValueError, TypeError, KeyError):
        return 0


def sent_counts_of(fl_ctx: FLContext) -> tuple | None:
    """(site, its cumulative sent counts, its held counts or None) from the task result being
    submitted, or None when the result carries no sent counts (another executor, a failed task)."""
    peer_ctx = fl_ctx.get_peer_context()
    result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
    if peer_ctx is None or not isinstance(result, Shareable):
        return None
    try:
        dxo = from_shareable(result)
    except (ValueError, TypeError, KeyError):
        return None
    counts, held = dxo.get_meta_prop(SENT_COUNTS_META), dxo.get_meta_prop(HELD_COUNTS_META)
    held = held if isinstance(held, dict) else None
    return (peer_ctx.get_identity_name(default="?"), counts, held) if isinstance(counts, dict) else None


def cross_site_result_of(fl_ctx: FLContext) -> tuple | None:
    """(model owner, data site, {metric: value} or None when the evaluation failed), or None."""
    owner, site = fl_ctx.get_prop(AppConstants.MODEL_OWNER), fl_ctx.get_prop(AppConstants.DATA_CLIENT)
    result = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
    if not isinstance(result, Shareable) or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
        return owner, site, None
    try:
        dxo = from_shareable(result)
    except ValueError:
        return None
    return (owner, site, dxo.data) if dxo.data_kind == DataKind.METRICS else None
