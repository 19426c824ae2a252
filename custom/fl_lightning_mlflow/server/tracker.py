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

import os
import threading
import time
from pathlib import Path

import numpy as np
from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType, LogWriterName
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

from fl_lightning_mlflow.common.protocol import (
    BEST_MODEL_STATS_KEY,
    DATASETS,
    DELIVERY_STATS_KEY,
    HELD_COUNTS_META,
    RECORD_KWARG,
    RECORDS_KWARG,
    REGISTERED_MODEL_STATS_KEY,
    SENT_COUNTS_META,
)
from fl_lightning_mlflow.server.delivery import DeliveryLedger
from fl_lightning_mlflow.server.mlflow_sink import PARENT, MLflowSink
from fl_lightning_mlflow.server.model_logger import ModelLogger
from fl_lightning_mlflow.server.model_policy import ModelPolicy
from fl_lightning_mlflow.server.model_selector import mode_of
from fl_lightning_mlflow.server.records import RecordChecker
from fl_lightning_mlflow.server.recovery import recover_workspace
from fl_lightning_mlflow.server.round_timings import RoundTimings, update_bytes
from fl_lightning_mlflow.server.summary import FederationSummary
from fl_lightning_mlflow.server.tracking_uri import TrackingConfigError, check_server, check_tracking_uri, redact_uri

METRIC_TYPES = (AnalyticsDataType.METRICS, AnalyticsDataType.METRIC, AnalyticsDataType.SCALAR)
ROUND_MODELS_DIR = "mlflow_round_models"  # in the job's run folder: round models waiting for the writer
TEXT_ITEMS = {AnalyticsDataType.PARAMETERS: "param", AnalyticsDataType.PARAMETER: "param",
              AnalyticsDataType.TAGS: "tag", AnalyticsDataType.TAG: "tag"}  # fmt: skip


class FederatedMLflowTracker(MLflowReceiver):
    def __init__(self, tracking_uri: str | None = None, kw_args: dict | None = None,
                 artifact_location: str | None = None, events: list | None = None,
                 buffer_flush_time: float | None = None,
                 registered_model_name: str = "", persistor_id: str = "persistor", metric_modes: dict | None = None,
                 fl_params: dict | None = None, promote_params: list | None = None, description: str = "",
                 max_memory_items: int = 200_000, retry_initial: float = 0.5, retry_max: float = 15.0,
                 final_flush_timeout: float = 120.0, http_request_max_retries: int = 2, http_request_timeout: int = 10,
                 model_selector_id: str = "model_selector", journal_sync_seconds: float = 1.0,
                 recover_orphans: bool = True, log_models: str = "best_and_final"):  # fmt: skip
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
                           "sync_seconds": float(journal_sync_seconds)}  # fmt: skip
        self.recover_orphans = recover_orphans
        self.final_flush_timeout = final_flush_timeout
        self.http_defaults = {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(http_request_max_retries),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(http_request_timeout),
        }
        self.model_selector_id = model_selector_id
        # Problems go to the log without firing FLARE log events from inside an event handler.
        self.records = RecordChecker(warn=self.logger.warning)
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
            self._queue_round_model(fl_round)
        elif event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            value = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
            if self.key_metric_mode == "min" and isinstance(value, (int, float)):
                value = -value  # the selector negates a lower-is-better metric to maximise it
            self.summary.set_best(fl_ctx.get_prop(AppConstants.CURRENT_ROUND), value)
        elif event_type == AppEventType.VALIDATION_RESULT_RECEIVED:
            result = cross_site_result_of(fl_ctx)
            if result:
                self.summary.add_cross_site(*result)
        elif event_type == EventType.FATAL_SYSTEM_ERROR:
            self.summary.fail(fl_ctx.get_prop(FLContextKey.EVENT_DATA, "fatal system error"))

    def _queue_round_model(self, fl_round) -> None:
        """The weights copied at the round's start, saved beside the journal (the queue carries
        the path, not megabytes) and queued after the round's metrics, which MLflow links to it."""
        if not self.round_weights or self.round_weights[0] != fl_round or self.round_weights[1] is None:
            return
        import torch

        folder = self.sink.run_dir / ROUND_MODELS_DIR
        try:
            folder.mkdir(exist_ok=True)
            path = folder / f"round_{fl_round}.pt"
            torch.save({k: torch.as_tensor(v) for k, v in self.round_weights[1].items()}, path)
            self.sink.round_model(path, fl_round)
        except Exception as e:  # noqa: BLE001 - a round's model is optional; training and tracking go on
            self.logger.warning(f"MLflow: round {fl_round}'s global model not logged: {type(e).__name__}: {e}")
        self.round_weights = None

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
        for name, value in self.http_defaults.items():
            os.environ.setdefault(name, value)
        workspace, job_id, engine = fl_ctx.get_workspace(), fl_ctx.get_job_id(), fl_ctx.get_engine()
        self.app_dir = Path(workspace.get_app_dir(job_id))
        result_root = Path(workspace.get_result_root(job_id))
        uri = self.tracking_uri or f"sqlite:///{(result_root / 'mlflow.db').resolve()}"
        # With a database store, keep artifacts beside it; a tracking server has its own store.
        artifacts = None if uri.startswith("http") else (result_root / "mlflow_artifacts").resolve().as_uri()
        if self.requested_artifacts:  # FLARE's receiver argument: a URI, or a path (relative: the job's run folder)
            given = self.requested_artifacts
            path = Path(workspace.get_run_dir(job_id)) / given if not Path(given).is_absolute() else Path(given)
            artifacts = given if "://" in given else path.resolve().as_uri()
        selector = engine.get_component(self.model_selector_id)
        modes = dict(self.metric_modes)
        if isinstance(selector, IntimeModelSelector):  # weigh the round means exactly as it does
            self.key_metric_mode = modes[selector.key_metric] = mode_of(selector)
            self.key_metric_name = selector.key_metric
            self.summary = FederationSummary(
                None, selector.weigh_by_local_iter, selector.aggregation_weights, metric_modes=modes
            )
        else:
            self.summary = FederationSummary(metric_modes=modes)
        self._use_persistor_model(engine)
        self.summary.num_rounds = self.fl_params.get("num_rounds")
        meta = fl_ctx.get_prop(ReservedKey.JOB_META) or {}
        job_name = self.kw_args.get("run_name") or meta.get("name") or self.experiment_name
        self.sink = MLflowSink(
            uri, workspace.get_run_dir(job_id), self.experiment_name, self.models,
            experiment_tags=self.kw_args.get("experiment_tags"), run_tags=self.kw_args.get("run_tags"),
            description=self.description, promote_params=self.promote_params, logger=self.logger,
            requested_artifacts=bool(self.requested_artifacts), **self.queue_args,
        )  # fmt: skip
        sites = sorted(c.name for c in engine.get_clients())
        self.sink.start(job_name, job_id, sites, {"job_name": meta.get("name") or job_name}, self.fl_params, artifacts)
        where = redact_uri(uri) if not uri.startswith("sqlite") else uri.replace("sqlite:///", "", 1)
        self.log_info(fl_ctx, f"MLflow tracking to {where}, experiment {self.experiment_name!r}")
        self.tracking = True
        if self.recover_orphans:
            own = Path(workspace.get_run_dir(job_id))
            threading.Thread(target=self._recover, args=(Path(workspace.get_root_dir()), own), daemon=True).start()

    def _use_persistor_model(self, engine) -> None:
        """The persistor's model (built from the job's module spec) is what the logged models copy."""
        persistor = engine.get_component(self.persistor_id)
        model = getattr(persistor, "model", None)
        if isinstance(model, str):  # a component id (e.g. FedOpt's shared "model" component)
            model = engine.get_component(model)
        if model is None:
            self.logger.warning(f"MLflow: no model in component {self.persistor_id!r}; global models are not logged")
            return
        self.models.use_model(model)

    def _recover(self, server_workspace: Path, own_run_dir: Path) -> None:
        """Earlier jobs of this FL server that died with their tracking unfinished (off FLARE's
        threads: this job does not wait for it)."""
        try:
            for run_dir, result in recover_workspace(server_workspace, exclude=own_run_dir, logger=self.logger):
                if isinstance(result, str):
                    self.logger.info(f"recovery: {run_dir}: {result}")
        except Exception as e:  # noqa: BLE001 - recovery is a service to earlier jobs; never this job's failure
            self.logger.error(f"recovery: {type(e).__name__}: {e}")

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
        self.sink.add_site(site)
        kind = data.data_type
        values = data.value if isinstance(data.value, dict) else {data.tag: data.value}
        if (data.kwargs or {}).get(RECORD_KWARG) == DATASETS and kind in TEXT_ITEMS:  # a site's dataset inputs
            self.sink.datasets(site, self.records.datasets(site, data.value))
        elif kind in METRIC_TYPES:
            records = (data.kwargs or {}).get(RECORDS_KWARG)  # FlareLogger's batch: [[step, round, values], ...]
            if not isinstance(records, list):
                records = [[data.step, None, values]]
            self.sink.metrics(site, self.records.metrics(site, records), _now())
        elif kind in TEXT_ITEMS:
            item = TEXT_ITEMS[kind]
            accepted = self.records.texts(site, item, values)
            if item == "param":
                self.sink.site_params(site, accepted)
            else:
                self.sink.tags(site, accepted)
        elif kind == AnalyticsDataType.TEXT and data.path:
            self.sink.text(site, data.value, data.path)
        else:
            self.records.unsupported(site, kind)

    # ----- end ----------------------------------------------------------------------------------
    def finalize(self, fl_ctx: FLContext):
        with self._lock:
            self.tracking = False
        try:
            status, failure, site_status = self.summary.outcome(self.sink.sites)
        except Exception as e:  # noqa: BLE001 - the runs must still end, with a status that says it
            status, failure, site_status = "FAILED", f"tracker could not sum up the job: {type(e).__name__}: {e}", {}
        try:
            points, rows = self.summary.cross_site()
            self.sink.cross_site(points, rows, _now())
        except Exception as e:  # noqa: BLE001 - the matrix is optional; the runs' ends and stats file are not
            self.logger.warning(f"MLflow: no cross-site table: {type(e).__name__}: {e}")
        # Delivery on the parent run: no site data comes in any more, so once the queue has drained
        # what MLflow wrote per site is final. One flush budget for this wait and finish's together.
        deadline = time.monotonic() + self.final_flush_timeout
        try:
            drained = self.sink.queue.drain(self.final_flush_timeout)
            self.sink.metrics(PARENT, self.delivery.metrics(self._delivery_table()), _now(), step=0)
        except Exception as e:  # noqa: BLE001 - the runs' ends and the stats file must still follow
            drained = False
            self.logger.warning(f"delivery: could not log the account on the parent run: {type(e).__name__}: {e}")
        left = max(0.0, deadline - time.monotonic())
        if drained:  # MLflow keeps up: the models and run ends still get a fair chance to be written
            left = max(left, min(30.0, self.final_flush_timeout))
        rounds_done = None if self.sink.last_round is None else self.sink.last_round + 1
        models = (self.app_dir / "FL_global_model.pt", self.app_dir / "best_FL_global_model.pt", self.summary.best,
                  rounds_done)  # fmt: skip
        lost = self.sink.finish(status, failure, site_status, models, left)
        # The final delivery account (after finish: what the last wait still wrote counts) goes
        # into the stats file with the rest, in the one write.
        try:
            table = self._delivery_table()
        except Exception as e:  # noqa: BLE001 - an account that cannot be made is said, not raised
            self.log_warning(fl_ctx, f"delivery: no account: {type(e).__name__}: {e}")
            table = None
        extra = {DELIVERY_STATS_KEY: table} if table is not None else {}
        if self.models.aliases:
            extra[REGISTERED_MODEL_STATS_KEY] = self.models.registered()
        if self.summary.best is not None:  # what flctl prints as the best model
            best_round, best_value = self.summary.best
            extra[BEST_MODEL_STATS_KEY] = {"round": best_round, "key_metric": self.key_metric_name,
                                           "value": best_value, "mode": self.key_metric_mode}  # fmt: skip
        complete, message = self.sink.report(status, failure, lost, self.records, self.timings, extra)
        (self.log_info if complete else self.log_error)(fl_ctx, message)
        if table is not None:
            (self.log_info if self.delivery.complete(table) else self.log_warning)(fl_ctx, self.delivery.message(table))

    def _delivery_table(self) -> dict:
        queue = self.sink.queue
        return self.delivery.table(
            self.records.received, queue.written_by_run, queue.refused_by_run, self.records.rejected_items
        )


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
