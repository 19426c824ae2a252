"""The wire protocol between the sites and the FL server, in one place.

Sites must not import server code (nor MLflow), and the server must read exactly what sites
send, so every name both sides use lives here, with MLflow's limits that both respect.

How a metric travels: a LightningModule's self.log() -> site.flare_logger.FlareLogger gathers
records [step, round, {name: value}] -> about once a second the site executor fires one FLARE
analytics event (ANALYTIC_EVENT_TYPE) whose DXO carries the last record as its value and all
of them under kwargs[RECORDS_KWARG] -> FLARE's ConvertToFedEvent forwards it to the server as
FED_ANALYTIC_EVENT_TYPE -> server.tracker (an MLflowReceiver) checks each record and queues it
-> server.write_queue writes it to the site's MLflow run in log_batch requests.

What a train result carries besides the weight difference (DXO meta): the metrics of the
global model the site received, measured on its validation data before local training
(MetaKey.INITIAL_METRICS, names prefixed GLOBAL_PREFIX), the number of training samples seen
(MetaKey.NUM_STEPS_CURRENT_ROUND: FedAvg's and the model selector's weight) and the number of
validation samples (VAL_SAMPLES_META).
"""

import functools
import re

# ----- FLARE events ------------------------------------------------------------------------
ANALYTIC_EVENT_TYPE = "analytix_log_stats"  # nvflare.apis.analytix.ANALYTIC_EVENT_TYPE
FED_EVENT_PREFIX = "fed."  # what ConvertToFedEvent prepends on the way to the server
FED_ANALYTIC_EVENT_TYPE = FED_EVENT_PREFIX + ANALYTIC_EVENT_TYPE

# ----- analytics records: the DXO "tag" says what the value holds ----------------------------
METRICS = "metrics"  # value {name: number}, one step
METRICS_BATCH = "metrics_batch"  # kwargs[RECORDS_KWARG]: [[step, round, {name: number}], ...]
PARAMS = "params"  # value {name: text}
TAGS = "tags"  # value {name: text}: the site's own tags (its disclosure policy's name and digest)
RECORDS_KWARG = "records"

# ----- train results -------------------------------------------------------------------------
GLOBAL_PREFIX = "global_"  # the received global model's metrics, before local training
VAL_SAMPLES_META = "val_samples"  # DXO meta: how many samples a site's metrics were computed on
# The train task reports the received global model's validation metrics (MetaKey.INITIAL_METRICS)
# under the names the module logs them, prefixed: a server-side model selector's key_metric is one
# of those (flctl check finds them with a dry validation step).

# ----- MLflow's limits, respected by both sides ---------------------------------------------
MAX_METRICS_PER_BATCH = 1000  # log_batch
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_KEY_LENGTH = 250  # metric, param and tag names
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
KEY_PATTERN = re.compile(r"^[\w\-. /:]+$")  # what MLflow accepts in a name
# A site's batch holds about a second of metrics, far fewer; more is a faulty or hostile site.
MAX_ITEMS_PER_EVENT = 20_000

# ----- what the FL server leaves in its job folder for tooling (flctl, tests, benchmarks) -----
STATS_FILE = "mlflow_tracking_stats.json"  # status, received / written / lost / rejected counts, run ids
REGISTERED_MODEL_STATS_KEY = "registered_model"  # the registry name, its aliases' versions and models:/ URIs
BEST_MODEL_STATS_KEY = "best_model"  # {"round", "key_metric", "value", "mode"}: the selector's pick
# A SCAFFOLD train task's header: the id of the run's lineage (a job and its continuations), under
# which a site keeps its own control variates per round (server.scaffold_workflow, site.scaffold_store).
SCAFFOLD_LINEAGE_HEADER = "fl_lightning_mlflow.scaffold_lineage"
# Where a site keeps state that outlives a job (a folder per site under it), when not in its own
# workspace: flctl's simulator runs set it, as nvflare simulator wipes its sites' folders each run.
SITE_STATE_ENV = "FL_SITE_STATE_DIR"
PARENT_RUN_KEY = "__parent__"  # the federation's run in the stats file's run_ids; sites are keyed by name
# What cross-site evaluation covered (server.cross_site_eval: all, global or none): a workflow context
# property for the tracker, a column of the parent run's cross-site table and a tag of the parent run.
CROSS_SITE_MODELS_PROP = "fl_lightning_mlflow.cross_site_models"
CROSS_SITE_MODELS_TAG = "cross_site_models"


NOT_IN_KEYS = re.compile(r"[^\w\-. /:]+")  # the characters KEY_PATTERN does not take


@functools.lru_cache(maxsize=10_000)
def clean_key(key: str) -> str:
    """A name MLflow accepts, made from one it would refuse, as Lightning's MLFlowLogger does it on
    the logging side (characters MLflow refuses dropped), and further: no ".." segment, no leading
    "/", at most MAX_KEY_LENGTH characters; "metric" if nothing is left. A good name is returned as is."""
    if check_key(key) is None:
        return key
    text = NOT_IN_KEYS.sub("", str(key))
    text = "/".join(part for part in text.split("/") if part != "..").lstrip("/")
    text = text[:MAX_KEY_LENGTH].rstrip("/") or "metric"
    return text if check_key(text) is None else "metric"


@functools.lru_cache(maxsize=10_000)  # every point of a series repeats its name: checked once
def check_key(key) -> str | None:
    """Why MLflow would refuse this metric, param or tag name, or None (names are dict keys:
    hashable)."""
    if not isinstance(key, str) or not key:
        return "empty or not a string"
    if len(key) > MAX_KEY_LENGTH:
        return f"longer than {MAX_KEY_LENGTH} characters"
    if not KEY_PATTERN.match(key) or ".." in key.split("/") or key.startswith("/"):
        return "has characters MLflow does not accept (allowed: letters, digits, _ - . space / :)"
    return None


# ----- delivery, counted end to end (server.delivery) -----------------------------------------
# Analytics events are best effort: one lost on the way is lost without a trace. Task results are
# not, so every train (and validate) result also carries, as DXO meta, what the site has handed
# to FLARE for the server so far: {kind: count} for SENT_KINDS, cumulative since the job started
# (a restarted site process carries on from its state file). The server compares the last count
# each site reported with what it received, what MLflow wrote and what MLflow refused for good.
SENT_COUNTS_META = "sent_counts"
SENT_KINDS = ("metric", "param", "tag")  # metric points (one value at one step), params, tags
DELIVERY_STATS_KEY = "delivery"  # the stats file's per-site table: sent / received / written / refused / lost
DELIVERY_METRIC_PREFIX = "delivery/"  # the parent run's metrics: delivery/<site>/<column>, step 0

# ----- held on the site: what the site's own outbound rules kept back (site.outbound) ----------
# Beside the sent counts, every task result carries HELD_COUNTS_META: {column: {kind: count}},
# cumulative like them, one column per outbound rule (HELD_COLUMNS). What a rule held never left,
# so it is not in the sent counts and the delivery account balances without it; the counts (never
# the values) become columns of the delivery table beside sent / written / refused / lost.
HELD_COUNTS_META = "held_counts"
WITHHELD = "withheld"  # the site's disclosure policy (site.disclosure_policy)
HELD_COLUMNS = (WITHHELD, "throttled")  # throttled: over the site's budget (common.stream_budget)
# metric points, params, tags, system metric points, dataset descriptions (cut or kept back),
# text artifacts (MLflowWriter.log_text)
HELD_KINDS = ("metric", "param", "tag", "system", "dataset", "text")
# The tags a site with a disclosure policy puts on its own run, so a reader of MLflow knows its
# data was filtered by the site's rule (the policy's name, the digest of its file, the noise and
# coarsening it applies: mechanisms and scales, never a raw value).
POLICY_NAME_TAG = "disclosure_policy"
POLICY_DIGEST_TAG = "disclosure_policy_digest"
POLICY_TRANSFORMS_TAG = "disclosure_policy_transforms"


# ----- dataset inputs (site -> server.records -> MlflowClient.log_inputs) ---------------------
# A site describes its training and validation data once, as an analytics TAGS event whose DXO
# tag is DATASETS and whose value is {context: JSON text of DATASET_FIELDS}. Tags, not params: a
# stock MLflowReceiver that gets one by mistake only sets two tags. Never samples, only counts.
DATASETS = "datasets"
# The project's own records (a DATASETS description) are marked by this kwarg, which no MLflowWriter
# call and no FlareLogger record sets: a user's param or tag named "datasets" is stored as any other.
RECORD_KWARG = "fl_lightning_mlflow_record"
DATASET_CONTEXTS = ("training", "validation")  # MLflow's dataset input tag mlflow.data.context
DATASET_FIELDS = ("name", "digest", "num_samples", "label_histogram", "source")
MAX_DATASET_DIGEST_LENGTH = 36  # MLflow's datasets.digest column
MAX_DATASET_NAME_LENGTH = 500  # MLflow's datasets.name column

# ----- system metrics (site/system_sampler -> the site's run, MLflow's own names) ------------
# The names MLflow's own sampler (mlflow.system_metrics) uses, so the MLflow UI's System metrics
# tab shows them; a site samples every system_metrics_seconds and sends them as metric records
# whose step is the sample's index, as MLflow's sampler does.
SYSTEM_PREFIX = "system/"
