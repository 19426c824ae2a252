"""The start of a tracked job (the tracker's initialize): where MLflow is, the summary weighed as
the model selector weighs, the model the logged global models copy, the sink and its run tree,
a continuation's runs reopened, the process's long-lived objects frozen for the garbage collector,
and earlier dead jobs' tracking recovered in the background.
"""

import gc
import os
import threading
from pathlib import Path

from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector

from fl_lightning_mlflow.server.mlflow_sink import MLflowSink
from fl_lightning_mlflow.server.model_selector import mode_of
from fl_lightning_mlflow.server.recovery import recover_workspace
from fl_lightning_mlflow.server.summary import FederationSummary
from fl_lightning_mlflow.server.tracking_uri import redact_uri


def start_job(tracker, fl_ctx: FLContext) -> None:
    for name, value in tracker.http_defaults.items():
        os.environ.setdefault(name, value)
    workspace, job_id, engine = fl_ctx.get_workspace(), fl_ctx.get_job_id(), fl_ctx.get_engine()
    tracker.app_dir = Path(workspace.get_app_dir(job_id))
    result_root = Path(workspace.get_result_root(job_id))
    uri = tracker.tracking_uri or f"sqlite:///{(result_root / 'mlflow.db').resolve()}"
    # With a database store, keep artifacts beside it; a tracking server has its own store.
    artifacts = None if uri.startswith("http") else (result_root / "mlflow_artifacts").resolve().as_uri()
    if tracker.requested_artifacts:  # FLARE's receiver argument: a URI, or a path (relative: the job's run folder)
        given = tracker.requested_artifacts
        path = Path(workspace.get_run_dir(job_id)) / given if not Path(given).is_absolute() else Path(given)
        artifacts = given if "://" in given else path.resolve().as_uri()
    selector = engine.get_component(tracker.model_selector_id)
    modes = dict(tracker.metric_modes)
    if isinstance(selector, IntimeModelSelector):  # weigh the round means exactly as it does
        tracker.key_metric_mode = modes[selector.key_metric] = mode_of(selector)
        tracker.key_metric_name = selector.key_metric
        tracker.summary = FederationSummary(
            None, selector.weigh_by_local_iter, selector.aggregation_weights, metric_modes=modes
        )
    else:
        tracker.summary = FederationSummary(metric_modes=modes)
    use_persistor_model(tracker, engine)
    tracker.summary.num_rounds = tracker.fl_params.get("num_rounds")
    meta = fl_ctx.get_prop(ReservedKey.JOB_META) or {}
    job_name = tracker.kw_args.get("run_name") or meta.get("name") or tracker.experiment_name
    tracker.sink = MLflowSink(
        uri, workspace.get_run_dir(job_id), tracker.experiment_name, tracker.models,
        experiment_tags=tracker.kw_args.get("experiment_tags"), run_tags=tracker.kw_args.get("run_tags"),
        description=tracker.description, promote_params=tracker.promote_params, logger=tracker.logger,
        requested_artifacts=bool(tracker.requested_artifacts), **tracker.queue_args,
        resume=tracker.continuation.sink_state() if tracker.continuation else None,
    )  # fmt: skip
    tracker.stream.sink = tracker.sink
    sites = sorted(c.name for c in engine.get_clients())
    tracker.sink.start(
        job_name, job_id, sites, {"job_name": meta.get("name") or job_name}, tracker.fl_params, artifacts
    )
    if tracker.continuation:  # the dead job's runs go on (server.continuation)
        tracker.continuation.start(tracker.sink, tracker.summary, tracker.app_dir, job_id, sites)
    where = redact_uri(uri) if not uri.startswith("sqlite") else uri.replace("sqlite:///", "", 1)
    tracker.log_info(fl_ctx, f"MLflow tracking to {where}, experiment {tracker.experiment_name!r}")
    freeze_long_lived_objects()
    if tracker.recover_orphans:
        own = Path(workspace.get_run_dir(job_id))
        threading.Thread(
            target=recover_earlier_jobs, args=(tracker.logger, Path(workspace.get_root_dir()), own), daemon=True
        ).start()


def freeze_long_lived_objects() -> int:
    """gc.freeze() what the FL server's job process holds once its job has started: its modules
    (torch, MLflow, SQLAlchemy, FLARE), some 600,000 objects that live as long as the process.
    FLARE's ScatterAndGather runs gc.collect() after every round (its memory_gc_rounds, default
    1), which scanned them all, about a second per round here; frozen, it scans only what came
    after, and still frees that. Returns how many objects were frozen."""
    gc.freeze()
    return gc.get_freeze_count()


def use_persistor_model(tracker, engine) -> None:
    """The persistor's model (built from the job's module spec) is what the logged models copy."""
    persistor = engine.get_component(tracker.persistor_id)
    model = getattr(persistor, "model", None)
    if isinstance(model, str):  # a component id (e.g. FedOpt's shared "model" component)
        model = engine.get_component(model)
    if model is None:
        tracker.logger.warning(f"MLflow: no model in component {tracker.persistor_id!r}; global models are not logged")
        return
    tracker.models.use_model(model)


def recover_earlier_jobs(logger, server_workspace: Path, own_run_dir: Path) -> None:
    """Earlier jobs of this FL server that died with their tracking unfinished (off FLARE's
    threads: this job does not wait for it)."""
    try:
        for run_dir, result in recover_workspace(server_workspace, exclude=own_run_dir, logger=logger):
            if isinstance(result, str):
                logger.info(f"recovery: {run_dir}: {result}")
    except Exception as e:  # noqa: BLE001 - recovery is a service to earlier jobs; never this job's failure
        logger.error(f"recovery: {type(e).__name__}: {e}")
