"""What a site sends besides its task results, and what it must remember across a restart.

SiteTelemetry is the executor's helper for everything that streams to the server: the analytics
events (one record per FLARE event, common.protocol), the cumulative sent counts the task results
carry (site.flare_logger.SentCounter), the site's dataset description (once per process), the
system sampler's series, and the state file a restarted site process (a simulator worker
restarted between tasks) carries on from. The executor speaks FLARE's tasks; this speaks FLARE's
events.
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
    METRICS_BATCH,
    PARAMS,
    RECORD_KWARG,
    RECORDS_KWARG,
)
from fl_lightning_mlflow.site.flare_logger import SentCounter
from fl_lightning_mlflow.site.system_sampler import SystemSampler

STATE_FILE = "site_state.json"  # survives a simulator worker that is restarted between tasks
DATA_TYPES = {PARAMS: AnalyticsDataType.PARAMETERS, DATASETS: AnalyticsDataType.TAGS}  # else METRICS


class SiteTelemetry:
    def __init__(self, component: FLComponent, system_metrics_seconds: float):
        """component: the FLARE component the events are fired from (the executor)."""
        self.component = component
        self.system_metrics_seconds = system_metrics_seconds
        self.sent = SentCounter()  # what this site handed to FLARE for the server, since the job started
        self.sampler: SystemSampler | None = None
        self.datasets_sent = False
        self.fl_ctx: FLContext | None = None  # the running task's context: events go out in it

    # ----- the state file ---------------------------------------------------------------------
    @staticmethod
    def saved(app_dir) -> dict:
        """What an earlier process of this site saved ({} when none)."""
        state = Path(app_dir) / STATE_FILE if app_dir else None
        return json.loads(state.read_text()) if state is not None and state.is_file() else {}

    def resume(self, saved: dict) -> None:
        """Carry on counting where the last process saved: the counts are cumulative."""
        self.sent = SentCounter(saved.get("sent_counts"))

    def save(self, app_dir, **state) -> None:
        """The state file: state's items (the engine's, the executor's), the sent counts, the sample index."""
        state = dict(state, sent_counts=self.sent.snapshot())
        if self.sampler is not None:
            state["system_step"] = self.sampler.step
        (Path(app_dir) / STATE_FILE).write_text(json.dumps(state))

    # ----- sending ------------------------------------------------------------------------
    def send(self, kind: str, values, step, fl_round, fl_ctx: FLContext | None = None) -> None:
        """One analytics record as one FLARE event (common.protocol), in the running task's
        context unless given one."""
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
        """The engines' sender: send, counted."""
        return self.sent.sender(self.send)

    def writer(self, writer):
        """A log writer (FLARE's MLflowWriter), its calls counted."""
        return self.sent.writer(writer)

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
