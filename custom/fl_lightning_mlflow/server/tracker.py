"""Server-side MLflow tracking for a federated job: the only component that talks to MLflow.

FederatedMLflowTracker subclasses FLARE's MLflowReceiver (same constructor arguments:
tracking_uri, kw_args with experiment_name, run_name, experiment_tags, run_tags; events) and
replaces its write path. It writes
  - one parent run per FL job (tags: job id, rounds, sites, library versions; params: the FL
    configuration) with the global metrics per round (step = round): the sample-weighted
    average of the sites' metrics on the global model they received, each site's value
    beside it, and how many sites contributed; the cross-site evaluation matrix; the final
    and best global models as MLflow PyTorch models, the best one registered;
  - one nested child run per site with the metrics and params that site streams.
Runs end FAILED when the job fails or aborts (a site's run when it dropped out), else FINISHED.

Nothing blocks FLARE's event thread: events only enqueue (mlflow_writer_queue.WriteQueue),
and failed writes are retried until the job ends; whatever is still unwritten then is
counted, logged and recorded in mlflow_tracking_stats.json in the job's workspace.
"""

import base64
import collections
import importlib
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType, LogWriterName
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

from fl_lightning_mlflow.server.write_queue import USERINFO, WriteQueue

PARENT = "__parent__"
STATS_FILE = "mlflow_tracking_stats.json"
VAL_SAMPLES_META = "val_samples"  # DXO meta: how many samples a site's metrics were computed on
MAX_KEY_LENGTH = 250  # MLflow's limit for metric/param/tag names
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
PARAM_TYPES = (AnalyticsDataType.PARAMETERS, AnalyticsDataType.PARAMETER)
TAG_TYPES = (AnalyticsDataType.TAGS, AnalyticsDataType.TAG)
MAX_ITEMS_PER_EVENT = 20_000  # a site's batch holds about a second of metrics: far fewer
KEY_PATTERN = re.compile(r"^[\w\-. /:]+$")  # what MLflow accepts in a name
SUPPORTED_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class TrackingConfigError(ValueError):
    pass


def check_tracking_uri(uri: str) -> str:
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else ""
    shown = redact_uri(uri)
    if uri.startswith("file:") or scheme == "":
        raise TrackingConfigError(
            f"tracking_uri {shown!r}: MLflow >= 3.13 refuses file stores; use sqlite:////abs/path/mlflow.db "
            "or http://host:port"
        )
    if scheme not in SUPPORTED_SCHEMES:
        raise TrackingConfigError(
            f"tracking_uri {shown!r}: unsupported scheme {scheme!r}, expected {SUPPORTED_SCHEMES}"
        )
    return uri


def redact_uri(uri: str) -> str:
    """The URI without a user:password@ part, for messages."""
    return USERINFO.sub("***@", uri)


def probe_tracking_server(uri: str, timeout: float = 3.0) -> tuple:
    """One quick authenticated request to an MLflow server: ("ok"|"refused"|"unreachable", detail).

    Sends the credentials MLflow's client would (MLFLOW_TRACKING_USERNAME and _PASSWORD, else
    MLFLOW_TRACKING_TOKEN, from the environment) and honours its TLS settings; the detail
    never holds a credential.
    """
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        context = None
        if uri.startswith("https"):
            if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
                context = ssl._create_unverified_context()
            else:
                context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
        request = urllib.request.Request(
            uri.rstrip("/") + "/api/2.0/mlflow/experiments/search", data=b'{"max_results": 1}', headers=headers
        )
        with urllib.request.urlopen(request, timeout=timeout, context=context):
            return "ok", ""
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            given = "no credentials were set" if "Authorization" not in headers else "the credentials were refused"
            return "refused", f"HTTP {e.code} {e.reason}: {given}"
        return "ok", f"HTTP {e.code} {e.reason}"  # a server-side problem: the write queue retries
    except Exception as e:  # noqa: BLE001 - network, TLS, not HTTP at all: no verdict on the credentials
        return "unreachable", f"{type(e).__name__}: {str(getattr(e, 'reason', e))[:200]}"


def check_key(key) -> str | None:
    """Why MLflow would refuse this name, or None."""
    if not isinstance(key, str) or not key:
        return "empty or not a string"
    if len(key) > MAX_KEY_LENGTH:
        return f"longer than {MAX_KEY_LENGTH} characters"
    if not KEY_PATTERN.match(key) or ".." in key.split("/") or key.startswith("/"):
        return "has characters MLflow does not accept (allowed: letters, digits, _ - . space / :)"
    return None


def versions() -> dict:
    out = {}
    for dist in ("nvflare", "pytorch-lightning", "mlflow", "torch"):
        try:
            out[f"{dist}_version"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class FederatedMLflowTracker(MLflowReceiver):
    def __init__(
        self,
        tracking_uri: str | None = None,
        kw_args: dict | None = None,
        events: list | None = None,
        registered_model_name: str = "",
        model_class_path: str = "fl_lightning_mlflow.common.network.CifarNet",
        fl_params: dict | None = None,
        promote_params: list | None = None,
        description: str = "",
        max_memory_items: int = 200_000,
        retry_initial: float = 0.5,
        retry_max: float = 15.0,
        final_flush_timeout: float = 120.0,
        http_request_max_retries: int = 2,
        http_request_timeout: int = 10,
    ):
        """Args are set in config_fed_server.json.

        tracking_uri: None or "" = sqlite mlflow.db in the server's job workspace; or
            sqlite:////abs.db, http://host:port. Credentials come from MLFLOW_TRACKING_USERNAME/
            PASSWORD (or _TOKEN) in the server's environment.
        kw_args: as MLflowReceiver: experiment_name, run_name (the parent run; default: the job
            name), experiment_tags, run_tags (on every run).
        registered_model_name: Model Registry name for the best global model ("" = experiment name).
        fl_params: FL configuration logged as params of the parent run.
        promote_params: site params also logged once on the parent (e.g. local_epochs, split).
        description: the experiment's description in the MLflow UI (set as mlflow.note.content
            in code: a dotted key in the JSON would be mangled by `nvflare job submit`).
        final_flush_timeout: at job end, how long to keep retrying unwritten data.
        http_request_*: defaults for MLflow's own HTTP retries, applied only where the
            environment does not set MLFLOW_HTTP_REQUEST_MAX_RETRIES/TIMEOUT; our queue retries
            beyond that without holding anything else up.
        """
        super().__init__(tracking_uri=tracking_uri or None, kw_args=kw_args, events=events)
        self.experiment_name = self.kw_args.get("experiment_name") or "hello-lightning-mlflow"
        if tracking_uri:
            check_tracking_uri(tracking_uri)
        for key in ("experiment_tags", "run_tags"):
            if not isinstance(self.kw_args.get(key, {}), dict):
                raise TrackingConfigError(f"kw_args.{key} must be an object of tag names to values")
        self.registered_model_name = registered_model_name or self.experiment_name
        self.model_class_path = model_class_path
        self.fl_params = fl_params or {}
        self.promote_params = set(promote_params or [])
        self.description = description
        self.queue_args = {"max_memory_items": max_memory_items, "retry_initial": retry_initial, "retry_max": retry_max}
        self.final_flush_timeout = final_flush_timeout
        self.http_defaults = {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(http_request_max_retries),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(http_request_timeout),
        }
        self.queue: WriteQueue | None = None
        self.sites: list = []
        self.received = collections.defaultdict(collections.Counter)  # site -> kind -> count
        self.rejected = collections.Counter()
        self.truncated = collections.Counter()
        self.max_event_seconds = 0.0
        self.probe_seconds = 0.0  # the one request at START_RUN that checks the server and credentials
        self.slowest_event = None
        self._models_logged: set = set()
        self._auto_step = collections.Counter()
        self._promoted: set = set()
        self._round_metrics = collections.defaultdict(dict)  # round -> site -> (metrics, weight)
        self._last_contribution = {}
        self._rounds_done = 0
        self._num_rounds = None
        self._best = None  # (round, metric)
        self._cse = {}  # (model owner, data site) -> metrics
        self._failure = None
        self.run_dir = self.app_dir = None
        self.job_id = ""

    # ----- event dispatch, timed: nothing here may wait on MLflow ---------------------------
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN and not self._tracking_server_accepts(fl_ctx):
            return  # not initialized: nothing is tracked, and the job is being stopped
        started = time.perf_counter()
        if self._initialized and not self._end:
            self._handle_fl_event(event_type, fl_ctx)
        super().handle_event(event_type, fl_ctx)
        if event_type != EventType.END_RUN:  # END_RUN flushes on purpose
            elapsed = time.perf_counter() - started
            if elapsed > self.max_event_seconds:
                self.max_event_seconds, self.slowest_event = elapsed, event_type

    def _handle_fl_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == AppEventType.ROUND_STARTED:
            self._num_rounds = fl_ctx.get_prop(AppConstants.NUM_ROUNDS, self._num_rounds)
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._collect_contribution(fl_ctx)
        elif event_type == AppEventType.ROUND_DONE:
            self._log_global_round(fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        elif event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE and self._failure is None:
            self._best = (fl_ctx.get_prop(AppConstants.CURRENT_ROUND), fl_ctx.get_prop(AppConstants.VALIDATION_RESULT))
        elif event_type == AppEventType.VALIDATION_RESULT_RECEIVED:
            self._collect_cross_site_result(fl_ctx)
        elif event_type == EventType.FATAL_SYSTEM_ERROR:
            self._failure = str(fl_ctx.get_prop(FLContextKey.EVENT_DATA, "fatal system error"))

    # ----- start ----------------------------------------------------------------------------
    def _tracking_server_accepts(self, fl_ctx: FLContext) -> bool:
        """Before the job trains: refused credentials stop it (retrying cannot help); an
        unreachable server does not (the write queue keeps the data and retries)."""
        uri = self.tracking_uri or ""
        if not uri.startswith(("http://", "https://")):
            return True
        shown = redact_uri(uri)
        started = time.perf_counter()
        verdict, detail = probe_tracking_server(uri)
        self.probe_seconds = time.perf_counter() - started
        if verdict == "refused":
            reason = (
                f"MLflow tracking server {shown} refused the FL server ({detail}); set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the FL server's environment. "
                "Stopping the job before training: nothing could be tracked"
            )
            self.system_panic(reason, fl_ctx)  # FLARE logs the reason, once
            return False
        if verdict == "unreachable":
            self.log_warning(
                fl_ctx,
                f"MLflow tracking server {shown} unreachable ({detail}); training goes on, data is kept and retried",
            )
        return True

    def initialize(self, fl_ctx: FLContext):
        for name, value in self.http_defaults.items():
            os.environ.setdefault(name, value)
        workspace, job_id = fl_ctx.get_workspace(), fl_ctx.get_job_id()
        self.job_id = job_id
        self.run_dir = Path(workspace.get_run_dir(job_id))
        self.app_dir = Path(workspace.get_app_dir(job_id))
        result_root = Path(workspace.get_result_root(job_id))
        uri = self.tracking_uri or f"sqlite:///{(result_root / 'mlflow.db').resolve()}"
        # With a database store, keep artifacts beside it; a tracking server has its own store.
        artifacts = None if uri.startswith("http") else (result_root / "mlflow_artifacts").resolve().as_uri()
        self.sites = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        meta = fl_ctx.get_prop(ReservedKey.JOB_META) or {}
        job_name = self.kw_args.get("run_name") or meta.get("name") or self.experiment_name
        self.queue = WriteQueue(
            uri,
            self.run_dir / "mlflow_spill.jsonl",
            actions={
                "setup": self._setup_runs,
                "child": self._create_child,
                "log_models": self._log_models,
                "log_table": self._log_table,
                "log_text": lambda client, run_key, text, path: client.log_text(
                    self.queue.run_ids[run_key], text, path
                ),
                "terminate": lambda client, run_key, status: client.set_terminated(self.queue.run_ids[run_key], status),
            },
            logger=self.logger,
            **self.queue_args,
        )
        tags = {**self.kw_args.get("run_tags", {}), "job_id": job_id, "sites": ",".join(self.sites), **versions()}
        tags["job_name"] = meta.get("name") or job_name
        self.queue.put(("call", "setup", [job_name, artifacts, tags]))
        for key, value in self.fl_params.items():
            self._put_param(PARENT, key, value)
        self._num_rounds = self.fl_params.get("num_rounds")
        where = redact_uri(uri) if not uri.startswith("sqlite") else uri.replace("sqlite:///", "", 1)
        self.log_info(fl_ctx, f"MLflow tracking to {where}, experiment {self.experiment_name!r}")

    def _setup_runs(self, client, job_name, artifacts, tags):
        """Writer thread: experiment, parent run and one child run per site (idempotent on retry)."""
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp:
            exp_id = exp.experiment_id
        else:
            exp_tags = {str(k): str(v) for k, v in self.kw_args.get("experiment_tags", {}).items()}
            exp_id = client.create_experiment(self.experiment_name, artifacts, tags=exp_tags)
        if self.description:
            client.set_experiment_tag(exp_id, "mlflow.note.content", self.description)
        self.queue.experiment_id = exp_id
        if PARENT not in self.queue.run_ids:
            parent = client.create_run(exp_id, run_name=job_name, tags={**tags, "role": "federation"})
            self.queue.run_ids[PARENT] = parent.info.run_id
        for site in self.sites:
            self._create_child(client, site)

    def _create_child(self, client, site):
        if site not in self.queue.run_ids:
            parent_id = self.queue.run_ids[PARENT]
            tags = {**self.kw_args.get("run_tags", {}), "mlflow.parentRunId": parent_id, "site": site, "role": "site"}
            run = client.create_run(self.queue.experiment_id, run_name=site, tags=tags)
            self.queue.run_ids[site] = run.info.run_id

    # ----- streamed site data -----------------------------------------------------------------
    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str):
        site = record_origin
        try:
            data = AnalyticsData.from_dxo(from_shareable(shareable), receiver=LogWriterName.MLFLOW)
        except (TypeError, ValueError, KeyError) as e:  # FLARE's own checks of what a site sent
            self._reject(fl_ctx, site, "event", None, f"is malformed ({type(e).__name__}: {str(e)[:200]})")
            return
        if data is None:
            return
        if site not in self.sites:
            self.sites.append(site)
            self.queue.put(("call", "child", [site]))
        kind = data.data_type
        if kind in (AnalyticsDataType.METRICS, AnalyticsDataType.METRIC, AnalyticsDataType.SCALAR):
            now = int(time.time() * 1000)
            records = (data.kwargs or {}).get("records")  # FlareLogger's batch: [[step, round, values], ...]
            if not isinstance(records, list):
                values = data.value if isinstance(data.value, dict) else {data.tag: data.value}
                records = [[data.step, None, values]]
            budget = MAX_ITEMS_PER_EVENT
            for record in records:
                if not (isinstance(record, (list, tuple)) and len(record) == 3 and isinstance(record[2], dict)):
                    self._reject(fl_ctx, site, "metric record", None, "is not [step, round, {name: value}]")
                    continue
                step, _, values = record
                if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
                    self._reject(fl_ctx, site, "metric record", None, f"has step {str(step)[:20]!r}, not an int >= 0")
                    continue
                if len(values) > budget:
                    self._reject(fl_ctx, site, "metric record", None, f"exceeds {MAX_ITEMS_PER_EVENT} values per event")
                    break
                budget -= len(values)
                for key, value in values.items():
                    self._put_metric(fl_ctx, site, key, value, step, now)
        elif kind in (*PARAM_TYPES, *TAG_TYPES):
            item, limit = ("param", MAX_PARAM_VALUE_LENGTH) if kind in PARAM_TYPES else ("tag", MAX_TAG_VALUE_LENGTH)
            values = data.value if isinstance(data.value, dict) else {data.tag: data.value}
            if len(values) > MAX_ITEMS_PER_EVENT:
                self._reject(fl_ctx, site, f"{item}s event", None, f"exceeds {MAX_ITEMS_PER_EVENT} values per event")
                return
            for key, value in values.items():
                if self._reject(fl_ctx, site, item, key):
                    continue
                self.received[site][item] += 1
                value = self._bounded(fl_ctx, site, item, key, value, limit)
                if item == "tag":
                    self.queue.put(("tag", site, key, value))
                    continue
                self._put_param(site, key, value)
                if key in self.promote_params and key not in self._promoted:
                    self._promoted.add(key)
                    self._put_param(PARENT, key, value)
        elif kind == AnalyticsDataType.TEXT and data.path:
            self.queue.put(("call", "log_text", [site, str(data.value), str(data.path)]))
        else:
            self.rejected[f"{site}: unsupported {kind}"] += 1

    def _put_metric(self, fl_ctx, site, key, value, step, now):
        if self._reject(fl_ctx, site, "metric", key):
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self._reject(fl_ctx, site, "metric", key, f"has a {type(value).__name__} value, not a number")
            return
        if step is None:  # no step given: count up per key rather than collapse on 0
            step = self._auto_step[(site, key)]
            self._auto_step[(site, key)] += 1
        self.received[site]["metric"] += 1
        self.queue.put(("metric", site, key, float(value), now, int(step)))

    def _reject(self, fl_ctx, site, kind, key, reason=None) -> bool:
        """Refuse what MLflow would refuse (or a malformed record) with a logged reason; True if refused."""
        reason = reason or (check_key(key) if kind in ("metric", "param", "tag") else None)
        if reason:
            named = f" name {str(key)[:60]!r}" if key is not None else ""
            self._count_and_log_once(fl_ctx, self.rejected, f"{site}: {kind}{named} {reason}", "rejected ")
        return reason is not None

    def _bounded(self, fl_ctx, site, kind, key, value, limit) -> str:
        """The value as text, cut to MLflow's limit; the cut is logged once per name and counted."""
        text = str(value)
        if len(text) > limit:
            what = f"{site}: {kind} {key!r} value of {len(text)} characters cut to {limit} (MLflow's limit)"
            self._count_and_log_once(fl_ctx, self.truncated, what)
            text = text[:limit]
        return text

    def _count_and_log_once(self, fl_ctx, counter: collections.Counter, what: str, prefix: str = ""):
        """Each distinct problem is logged once; how often it happened goes to the stats file."""
        counter[what] += 1
        if counter[what] == 1:
            self.log_warning(fl_ctx, prefix + what)

    def _put_param(self, run_key, key, value):
        self.queue.put(("param", run_key, key, str(value)[:MAX_PARAM_VALUE_LENGTH]))

    # ----- the federation's view: per round, best model, cross-site matrix ---------------------
    def _collect_contribution(self, fl_ctx: FLContext):
        peer_ctx = fl_ctx.get_peer_context()
        shareable = peer_ctx.get_prop(FLContextKey.SHAREABLE) if peer_ctx else None
        if shareable is None:
            return
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return
        site = peer_ctx.get_identity_name(default="?")
        fl_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        metrics = dxo.get_meta_prop(MetaKey.INITIAL_METRICS)
        if isinstance(metrics, dict) and fl_round is not None:
            weight = dxo.get_meta_prop(VAL_SAMPLES_META) or dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) or 1
            self._round_metrics[fl_round][site] = (metrics, float(weight))
        if fl_round is not None:
            self._last_contribution[site] = fl_round

    def _log_global_round(self, fl_round):
        if fl_round is None:
            return
        self._rounds_done += 1
        contributions = self._round_metrics.pop(fl_round, {})
        now = int(time.time() * 1000)
        keys = sorted({k for metrics, _ in contributions.values() for k in metrics})
        for key in keys:
            pairs = [(m[key], w) for m, w in contributions.values() if isinstance(m.get(key), (int, float))]
            if pairs:
                mean = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
                self.queue.put(("metric", PARENT, key, mean, now, fl_round))
            for site, (metrics, _) in sorted(contributions.items()):
                if isinstance(metrics.get(key), (int, float)):
                    self.queue.put(("metric", PARENT, f"{key}/{site}", float(metrics[key]), now, fl_round))
        self.queue.put(("metric", PARENT, "contributing_sites", float(len(contributions)), now, fl_round))

    def _collect_cross_site_result(self, fl_ctx: FLContext):
        owner = fl_ctx.get_prop(AppConstants.MODEL_OWNER)
        site = fl_ctx.get_prop(AppConstants.DATA_CLIENT)
        result = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
        if not isinstance(result, Shareable) or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            self._cse[(owner, site)] = None
            return
        try:
            dxo = from_shareable(result)
        except ValueError:
            return
        if dxo.data_kind == DataKind.METRICS:
            self._cse[(owner, site)] = {k: float(v) for k, v in dxo.data.items() if isinstance(v, (int, float))}

    # ----- end ----------------------------------------------------------------------------------
    def finalize(self, fl_ctx: FLContext):
        if self._failure is None and self._num_rounds and self._rounds_done < int(self._num_rounds):
            self._failure = f"ended after {self._rounds_done} of {self._num_rounds} rounds"
        status = "FAILED" if self._failure else "FINISHED"
        now = int(time.time() * 1000)
        if self._failure:
            self.queue.put(("tag", PARENT, "failure_reason", self._failure[:MAX_TAG_VALUE_LENGTH]))
        self._queue_cross_site_matrix(now)
        final, best = self.app_dir / "FL_global_model.pt", self.app_dir / "best_FL_global_model.pt"
        if final.is_file() or best.is_file():
            best_info = list(self._best) if self._best else None
            self.queue.put(("call", "log_models", [str(final), str(best), best_info, status == "FINISHED"]))
        last_round = self._rounds_done - 1
        for site in self.sites:
            dropped = self._last_contribution.get(site, -1) < last_round
            site_status = "FAILED" if (self._failure or dropped) else "FINISHED"
            self.queue.put(("call", "terminate", [site, site_status]))
        self.queue.put(("call", "terminate", [PARENT, status]))

        flushed = self.queue.drain(self.final_flush_timeout)
        lost = self.queue.close(timeout=5 if flushed else 1)
        self._report(fl_ctx, status, lost)

    def _queue_cross_site_matrix(self, now):
        if not self._cse:
            return
        rows = []
        for (owner, site), metrics in sorted(self._cse.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
            for key, value in (metrics or {}).items():
                self.queue.put(("metric", PARENT, f"cross_site/{owner}/{site}/{key}", value, now, 0))
                rows.append({"model": owner, "data_site": site, "metric": key, "value": value})
            if metrics is None:
                rows.append({"model": owner, "data_site": site, "metric": "error", "value": float("nan")})
        self.queue.put(("call", "log_table", [PARENT, rows, "cross_site_validation.json"]))

    def _log_table(self, client, run_key, rows, artifact_file):
        columns = {name: [r[name] for r in rows] for name in ("model", "data_site", "metric", "value")}
        client.log_table(self.queue.run_ids[run_key], columns, artifact_file)

    def _load_model(self, path):
        import torch

        module, _, name = self.model_class_path.rpartition(".")
        net = getattr(importlib.import_module(module), name)()
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = saved.get("model", saved)
        net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        # code_paths takes the whole top-level package, so the pickled class imports where the model loads
        return net.eval(), str(Path(sys.modules[module.partition(".")[0]].__file__).parent)

    def _log_models(self, client, final_path, best_path, best_info, register):
        """Writer thread: final and best global models as MLflow PyTorch models; best one registered."""
        import mlflow
        import mlflow.pytorch
        import numpy as np

        mlflow.set_tracking_uri(self.queue.tracking_uri)
        example = np.zeros((1, 3, 32, 32), dtype=np.float32)
        parent_id = self.queue.run_ids[PARENT]
        logged = self._models_logged  # a retried call skips what an earlier attempt logged
        with mlflow.start_run(run_id=parent_id):
            for name, path in (("final_global_model", final_path), ("best_global_model", best_path)):
                if name in logged or not Path(path).is_file():
                    continue
                net, code = self._load_model(path)
                registered = self.registered_model_name if (name == "best_global_model" and register) else None
                info = mlflow.pytorch.log_model(
                    net,
                    name=name,
                    code_paths=[code],
                    input_example=example,
                    pip_requirements=[f"torch=={metadata.version('torch')}"],
                    registered_model_name=registered,
                    serialization_format="pickle",  # a plain nn.Module: any batch size, code_paths bring the class
                )
                if registered and info.registered_model_version:
                    version = str(info.registered_model_version)
                    if best_info:
                        client.set_model_version_tag(registered, version, "round", str(best_info[0]))
                        client.set_model_version_tag(registered, version, "key_metric_value", str(best_info[1]))
                    client.set_model_version_tag(registered, version, "job_id", self.job_id)
                logged.add(name)

    def _report(self, fl_ctx: FLContext, status: str, lost: collections.Counter):
        stats = {
            "status": status,
            "failure": self._failure,
            "received": {site: dict(c) for site, c in self.received.items()},
            "written": {k: v for k, v in self.queue.stats.items() if k.startswith("written_")},
            "lost": dict(lost),
            "rejected": dict(self.rejected),
            "truncated": dict(self.truncated),
            "write_failures": self.queue.stats["failures"],
            "spilled": self.queue.stats["spilled"],
            "max_event_seconds": round(self.max_event_seconds, 6),
            "probe_seconds": round(self.probe_seconds, 6),
            "slowest_event": self.slowest_event,
            "run_ids": dict(self.queue.run_ids),
        }
        (self.run_dir / STATS_FILE).write_text(json.dumps(stats, indent=2))
        if sum(lost.values()):
            self.log_error(
                fl_ctx,
                f"MLflow: could not write {dict(lost)} after retrying until job end "
                f"(last error: {redact_uri(str(self.queue.last_error))}); counts in {self.run_dir / STATS_FILE}",
            )
            try:  # one quick attempt to mark the loss on the run itself
                if PARENT in self.queue.run_ids and self.queue.client is not None:
                    self.queue.client.set_tag(self.queue.run_ids[PARENT], "lost_items", json.dumps(dict(lost)))
            except Exception:  # noqa: BLE001 - the server is still unreachable; the log and file say it
                pass
        else:
            self.log_info(
                fl_ctx,
                f"MLflow: all written ({stats['written']}); status {status}; "
                f"slowest event handled in {self.max_event_seconds * 1000:.1f} ms",
            )
