"""What a site sends besides its task results, and what it must remember across a restart.

SiteTelemetry is the executor's helper for everything that streams to the server: the analytics
events (one record per FLARE event, common.protocol), the cumulative sent counts the task results
carry (site.flare_logger.SentCounter), the site's dataset description (once per process), the
system sampler's series, and the state file a restarted site process (a simulator worker
restarted between tasks) carries on from. The executor speaks FLARE's tasks; this speaks FLARE's
events.

Everything sent passes the site's outbound gate (site.outbound) first: send() fires only what the
gate lets out, and the sent counts count only that; the gate counts what its rules held back (the
site's disclosure policy: site.disclosure_rule). The policy's own tags (its name and digest) are
the site's statement about its stream and pass around the gate.
"""

import json
from pathlib import Path

from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo

from fl_lightning_mlflow.common.protocol import (
    ANALYTIC_EVENT_TYPE,
    DATASETS,
    HELD_COLUMNS,
    MAX_ITEMS_PER_EVENT,
    METRICS_BATCH,
    PARAMS,
    POLICY_DIGEST_TAG,
    POLICY_NAME_TAG,
    POLICY_TRANSFORMS_TAG,
    RECORD_KWARG,
    RECORDS_KWARG,
    TAGS,
)
from fl_lightning_mlflow.common.stream_budget import StreamBudget
from fl_lightning_mlflow.site.budget_rule import BudgetRule
from fl_lightning_mlflow.site.disclosure_policy import Policy, policy_path, read_policy
from fl_lightning_mlflow.site.disclosure_rule import DisclosureRule
from fl_lightning_mlflow.site.flare_logger import SentCounter
from fl_lightning_mlflow.site.outbound import OutboundGate
from fl_lightning_mlflow.site.system_sampler import SystemSampler

STATE_FILE = "site_state.json"  # survives a simulator worker that is restarted between tasks
DATA_TYPES = {
    PARAMS: AnalyticsDataType.PARAMETERS,
    TAGS: AnalyticsDataType.TAGS,
    DATASETS: AnalyticsDataType.TAGS,
}  # fmt: skip - else METRICS


def chunks(records: list, most: int):
    """records [[step, round, {name: value}], ...] in runs of at most `most` values (a record with
    more stays whole: the server counts it as rejected rather than the site splitting a step)."""
    run, size = [], 0
    for record in records:
        if run and size + len(record[2]) > most:
            yield run
            run, size = [], 0
        run.append(record)
        size += len(record[2])
    if run:
        yield run


class SiteTelemetry:
    def __init__(self, component: FLComponent, system_metrics_seconds: float, stream_budget: dict | None = None):
        """component: the FLARE component the events are fired from (the executor); stream_budget:
        what the site may stream (common.stream_budget's config form; None: the default, {}: none)."""
        self.component = component
        self.system_metrics_seconds = system_metrics_seconds
        self.sent = SentCounter()  # what this site handed to FLARE for the server, since the job started
        self.sampler: SystemSampler | None = None
        self.datasets_sent = False
        # What may leave the site; use_policy adds the site's disclosure rule.
        self.gate = OutboundGate(columns=HELD_COLUMNS)
        budget = StreamBudget.parse(stream_budget, "SiteExecutor.stream_budget")  # BudgetError: one line
        if budget is not None:  # after the policy's rule: what the policy withholds uses no budget
            self.gate.add(BudgetRule(budget))
        self.policy: Policy | None = None
        self.policy_rule: DisclosureRule | None = None
        self.policy_announced = False
        self.fl_ctx: FLContext | None = None  # the running task's context: events go out in it

    def val_samples(self, n: int) -> None:
        """The site's validation samples, once its engine is set up (min_validation_samples)."""
        if self.policy_rule is not None:
            self.policy_rule.val_samples = n

    # ----- the state file ---------------------------------------------------------------------
    @staticmethod
    def saved(app_dir) -> dict:
        """What an earlier process of this site saved ({} when none)."""
        state = Path(app_dir) / STATE_FILE if app_dir else None
        return json.loads(state.read_text()) if state is not None and state.is_file() else {}

    def resume(self, saved: dict) -> None:
        """Carry on counting where the last process saved: the counts are cumulative."""
        self.sent = SentCounter(saved.get("sent_counts"))
        self.gate.resume(saved.get("held_counts"))

    def load_policy(self, site_config_dir, site: str) -> str:
        """The site's disclosure policy from its own local/ folder (site.disclosure_policy), never
        from the job; the line for the site's log. A file with a problem raises PolicyError (a
        ValueError: the executor's setup error, so nothing runs and nothing leaks)."""
        path = policy_path(site_config_dir, site)
        if path is None:
            return f"{site}: no disclosure policy in {site_config_dir}: everything streamed leaves"
        self.use_policy(read_policy(path))
        transforms = f"; {self.policy.transforms()}" if self.policy.transforms() else ""
        return f"{site}: disclosure policy {self.policy.name!r} ({self.policy.digest}) from {path}{transforms}"

    def use_policy(self, policy: Policy | None) -> None:
        """The site's disclosure policy (site.disclosure_policy) from its local/ folder; None: none."""
        self.policy = policy
        if policy is not None:
            self.policy_rule = DisclosureRule(policy)
            self.gate.add(self.policy_rule, first=True)

    def save(self, app_dir, **state) -> None:
        """The state file: state's items (the engine's, the executor's), the sent counts, the sample index."""
        state = dict(state, sent_counts=self.sent.snapshot(), held_counts=self.gate.snapshot())
        if self.sampler is not None:
            state["system_step"] = self.sampler.step
        (Path(app_dir) / STATE_FILE).write_text(json.dumps(state))

    # ----- sending ------------------------------------------------------------------------
    def send(self, kind: str, values, step, fl_round, fl_ctx: FLContext | None = None):
        """One analytics record, as much of it as the outbound gate lets out, as one FLARE event
        (common.protocol), in the running task's context unless given one. Returns what was sent
        (None: the gate let nothing out, and nothing was sent)."""
        values = self.gate.let_out(kind, values)
        if values is None:
            return None
        if kind == METRICS_BATCH:  # within what the server takes in one event
            for chunk in chunks(values, MAX_ITEMS_PER_EVENT):
                self._fire(kind, chunk, chunk[-1][0], fl_round, fl_ctx)
        else:
            self._fire(kind, values, step, fl_round, fl_ctx)
        return values

    def _fire(self, kind: str, values, step, fl_round, fl_ctx: FLContext | None = None) -> None:
        kwargs = {"global_step": step} if step is not None else {}
        if fl_round is not None:
            kwargs["round"] = fl_round
        if kind == DATASETS:  # the project's own record: marked so no user param or tag is taken for it
            kwargs[RECORD_KWARG] = DATASETS
        if kind == METRICS_BATCH:  # the records ride in kwargs; value is the last one, for plain receivers
            kwargs[RECORDS_KWARG] = values
            values = values[-1][2]
        data_type = DATA_TYPES.get(kind, AnalyticsDataType.METRICS)
        dxo = create_analytic_dxo(tag=kind, value=values, data_type=data_type, writer=LogWriterName.MLFLOW, **kwargs)
        send_analytic_dxo(self.component, dxo=dxo, fl_ctx=fl_ctx or self.fl_ctx, event_type=ANALYTIC_EVENT_TYPE)

    def sender(self):
        """The engines' sender: send, counting what left (what the gate let out)."""

        def counted(kind, values, step, fl_round):
            sent = self.send(kind, values, step, fl_round)
            if sent is not None:
                self.sent.record(kind, sent)

        return counted

    def writer(self, writer):
        """A log writer (FLARE's MLflowWriter): its calls pass the gate, then are counted."""
        return self.gate.writer(self.sent.writer(writer))

    def announce_policy(self, engine) -> None:
        """The policy's name, digest and transforms as tags of the site's run, once per process
        (a restarted site setting them again is harmless). Counted as sent: the server counts them."""
        if self.policy is None or self.policy_announced or not engine.tracking:
            return
        self.policy_announced = True
        tags = {POLICY_NAME_TAG: self.policy.name, POLICY_DIGEST_TAG: self.policy.digest}
        if self.policy.transforms():
            tags[POLICY_TRANSFORMS_TAG] = self.policy.transforms()
        self._fire(TAGS, tags, None, None)
        self.sent.record(TAGS, tags)

    def send_datasets(self, engine) -> None:
        """The site's training and validation data as dataset inputs of its run, once per process
        (MLflow keeps one input per digest and context, so a restarted site sending again is harmless)."""
        if self.datasets_sent or not engine.tracking:
            return
        self.datasets_sent = True
        described = engine.describe_datasets()
        if described:
            self.send(DATASETS, described, None, None)

    # ----- system metrics -----------------------------------------------------------------
    def start_sampler(self, flare_engine, start_step: int, warn) -> None:
        """Sample CPU, memory and GPU use every system_metrics_seconds (0: off) on a thread of its own."""
        if self.system_metrics_seconds <= 0:
            return

        def send_records(records):
            # Off the task's thread: a FLARE context of its own, so samples go out between tasks too.
            # Not in the sent counts: samples keep coming after a site's last task result, and the
            # very last may leave as the server stops listening; delivery accounting covers the
            # training records (the server leaves system/ points out of it too).
            self.send(METRICS_BATCH, records, None, None, fl_ctx=flare_engine.new_context())

        self.sampler = SystemSampler(self.system_metrics_seconds, send_records, start_step=start_step, warn=warn)
        self.sampler.start()

    def stop_sampler(self) -> bool:
        """Stop sampling; whether a sampler ran."""
        if self.sampler is None:
            return False
        self.sampler.stop()
        return True
