"""The server's write path against FLARE's MLflowReceiver: the same stream, the same entry point.

Both receivers are FLARE AnalyticsReceivers. Each is started as FLARE starts it (START_RUN, which
calls initialize), fed the same list of analytics events through `save(fl_ctx, shareable, site)`
(what FLARE calls for every `fed.analytix_log_stats` event), and ended with END_RUN (finalize).
Around them is the smallest server context FLARE's code asks for: a real FLContext and
Workspace, and an engine object that answers get_workspace / get_clients / get_component; no
FLARE process runs. Each receiver writes into a fresh SQLite store; the time runs from the first
event (START_RUN) to the end of finalize (all written), the store's tables made beforehand; every
point is counted back from MLflow. The profile is of MLflow's store alone (log_batch), where
the writer thread spends its time.

The stream is what FLARE's own MLflow writer sends: one METRICS event per site and step with
`keys` values, the sites interleaved. FLARE's receiver sends its buffer in one log_batch per
flush; MLflow refuses a batch of more than 1,000 metrics, so a site that sends more than that
between flushes loses them (counted here, not hidden).
"""

import cProfile
import gc
import io
import pstats
import statistics
import time
from pathlib import Path

from bench_common import say, spread

KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "grad_norm", "epoch", "step_time")


def settings(quick: bool) -> dict:
    if quick:
        return {"sites": 4, "points": 20_000, "repeats": 1}
    return {"sites": 4, "points": 100_000, "repeats": 3}


class BenchEngine:
    """What a receiver asks of FLARE's server engine (at START_RUN, and fire_event at END_RUN)."""

    def __init__(self, workspace, sites):
        from nvflare.apis.client import Client

        self.workspace = workspace
        self.clients = [Client(s, None) for s in sites]

    def get_workspace(self):
        return self.workspace

    def get_clients(self):
        return self.clients

    def get_component(self, component_id):
        return None

    def fire_event(self, event_type, fl_ctx):
        """Our tracker fires an event when writes are left for recovery at job end; nothing listens here."""


def context(folder: Path, sites):
    from nvflare.apis.fl_constant import ProcessType, ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.workspace import Workspace

    job_id = "bench_job"
    for sub in ("startup", "local", f"{job_id}/app_server"):  # what FLARE's Workspace checks for / writes into
        (folder / sub).mkdir(parents=True, exist_ok=True)
    fl_ctx = FLContext()
    fl_ctx.set_prop(
        ReservedKey.ENGINE, BenchEngine(Workspace(str(folder), "server"), sites), private=True, sticky=False
    )
    fl_ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=False)
    fl_ctx.set_prop(ReservedKey.PROCESS_TYPE, ProcessType.SERVER_JOB, private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "server", private=False, sticky=False)
    return fl_ctx


def stream(sites: int, points: int) -> list:
    """[(site, shareable)]: METRICS events, len(KEYS) values each, sites interleaved per step."""
    from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType, LogWriterName

    out = []
    for step in range(points // (sites * len(KEYS))):
        for k in range(sites):
            data = AnalyticsData(
                key="metrics",
                value={key: 0.5 + step * 1e-6 for key in KEYS},
                data_type=AnalyticsDataType.METRICS,
                sender=LogWriterName.MLFLOW,
                global_step=step,  # FLARE's writers' name for it (a plain step= is dropped)
            )
            out.append((f"site-{k + 1}", data.to_dxo().to_shareable()))
    return out


def make_receiver(kind: str, uri: str, experiment: str = "write-path", writers: int | None = None):
    """kind "ours" (writers: requests in flight; None: the tracker's default for the URI) or "flare"."""
    if kind == "ours":
        from fl_lightning_mlflow.server.tracker import FederatedMLflowTracker

        # final_flush_timeout: the time is measured until all is written, as FLARE's receiver (no
        # cap) is; the default 120 s cap is reached on a 2-core machine others load to 10 and more.
        return FederatedMLflowTracker(
            tracking_uri=uri, kw_args={"experiment_name": experiment}, recover_orphans=False, writers=writers,
            final_flush_timeout=600,
        )  # fmt: skip
    from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

    return MLflowReceiver(tracking_uri=uri, kw_args={"experiment_name": experiment})


def feed(kind: str, folder: Path, events: list, sites: list, uri=None, experiment="write-path", writers=None,
         meter=None) -> dict:  # fmt: skip
    """One receiver, the whole stream, counted back from MLflow; into a fresh SQLite store in
    folder, or (uri) a tracking server, each run its own experiment there. meter: () -> {name:
    CPU seconds} of the server's processes, read around the timed part."""
    from mlflow.tracking import MlflowClient
    from nvflare.apis.event_type import EventType

    folder.mkdir(parents=True, exist_ok=True)
    uri = uri or f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the store's tables exist before timing, as in any deployment
    receiver = make_receiver(kind, uri, experiment, writers)
    fl_ctx = context(folder, sites)
    errors = 0
    full_gcs = FullCollections()
    gc.callbacks.append(full_gcs)
    cpu_before = (meter() if meter else {}) | {"this process": time.process_time()}
    started = time.perf_counter()
    receiver.handle_event(EventType.START_RUN, fl_ctx)
    save_s = 0.0
    for site, shareable in events:
        t = time.perf_counter()
        try:
            receiver.save(fl_ctx, shareable, site)
        except Exception:  # noqa: BLE001 - FLARE's receiver raises on a refused batch: counted as lost below
            errors += 1
        save_s += time.perf_counter() - t
    receiver.handle_event(EventType.END_RUN, fl_ctx)
    elapsed = time.perf_counter() - started
    cpu_after = (meter() if meter else {}) | {"this process": time.process_time()}
    gc.callbacks.remove(full_gcs)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    stored = 0
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        for key in KEYS:
            if key in run.data.metrics:
                stored += len(client.get_metric_history(run.info.run_id, key))
    sent = len(events) * len(KEYS)
    out = {
        "points": sent,
        "stored": stored,
        "lost": sent - stored,
        "seconds": elapsed,
        "points_per_s": stored / elapsed,
        "save_us_per_event": save_s / len(events) * 1e6,
        "save_errors": errors,
        "full_gcs": full_gcs.count,
        "full_gc_seconds": full_gcs.seconds,
        "cpu_seconds": {name: cpu_after[name] - cpu_before[name] for name in cpu_after},
    }
    return out


class FullCollections:
    """gc callback: how many full (generation 2) collections ran, and for how long. The writer
    allocates thousands of ORM objects per request, so CPython collects often, and a full
    collection walks every object of the process (about half a million here)."""

    def __init__(self):
        self.count, self.seconds, self._started = 0, 0.0, None

    def __call__(self, phase, info):
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.count += 1
            self.seconds += time.perf_counter() - self._started
            self._started = None


def store_ceiling(folder: Path, points: int, profile: bool = False, uri=None, experiment="ceiling") -> dict:
    """MlflowClient.log_batch alone, 1,000 metrics a request, one request at a time, into SQLite
    (or the tracking server at uri): what the store takes."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri or f"sqlite:///{folder / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    now = int(time.time() * 1000)
    batches = [
        [Metric(KEYS[i % len(KEYS)], 0.5, now, b * 1000 + i) for i in range(1000)] for b in range(points // 1000)
    ]
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    for batch in batches:
        client.log_batch(run_id, metrics=batch)
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - started
    out = {
        "points": points,
        "seconds": elapsed,
        "points_per_s": points / elapsed,
        "ms_per_request": elapsed / len(batches) * 1000,
    }
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
        out["profile_top"] = text.getvalue()[-6000:]
    return out


def run(work: Path, quick: bool, results: dict, save) -> dict:
    cfg = results.setdefault("config", settings(quick))
    sites = [f"site-{k + 1}" for k in range(cfg["sites"])]
    events = stream(cfg["sites"], cfg["points"])
    reps = results.setdefault("repeats", [])
    while len(reps) < cfg["repeats"]:
        i = len(reps)
        rep = {}
        for kind in ("ours", "flare") if i % 2 == 0 else ("flare", "ours"):
            rep[kind] = feed(kind, work / f"write-path-{kind}-{i}-{time.time_ns()}", events, sites)
            say(
                f"    repeat {i + 1}: {kind}: {rep[kind]['points_per_s']:.0f} points/s, "
                f"{rep[kind]['stored']} of {rep[kind]['points']} stored"
            )
        rep["store_ceiling"] = store_ceiling(work / f"write-path-ceiling-{i}-{time.time_ns()}", cfg["points"])
        say(f"    repeat {i + 1}: log_batch alone: {rep['store_ceiling']['points_per_s']:.0f} points/s")
        reps.append(rep)
        save()
    if "frozen" not in results:
        # What the collector costs: each receiver once more, the process's objects frozen first
        # (gc.freeze: the collector skips them), so only the run's own objects are walked.
        frozen = {}
        for kind in ("ours", "flare"):
            gc.collect()
            gc.freeze()
            try:
                frozen[kind] = feed(kind, work / f"write-path-frozen-{kind}-{time.time_ns()}", events, sites)
            finally:
                gc.unfreeze()
            say(f"    gc.freeze() first: {kind}: {frozen[kind]['points_per_s']:.0f} points/s")
        results["frozen"] = frozen
        save()
    if "profile" not in results:
        prof = store_ceiling(work / f"write-path-profile-{time.time_ns()}", cfg["points"] // 2, profile=True)
        results["profile"] = prof.pop("profile_top")
        save()
    results["summary"] = {
        kind: {
            "points_per_s": spread([r[kind]["points_per_s"] for r in reps]),
            "lost": [r[kind]["lost"] for r in reps],
            "save_us_per_event": spread([r[kind]["save_us_per_event"] for r in reps]),
            "full_gc_seconds": spread([r[kind].get("full_gc_seconds", 0.0) for r in reps]),
            "full_gcs": [r[kind].get("full_gcs") for r in reps],
        }
        for kind in ("ours", "flare")
    }
    results["summary"]["store_ceiling"] = {"points_per_s": spread([r["store_ceiling"]["points_per_s"] for r in reps])}
    save()
    import write_path_server  # here: it builds on this module's parts

    write_path_server.run(work, quick, results.setdefault("server", {}), save)  # the store users deploy
    return results


def table(results) -> str:
    cfg, s = results["config"], results["summary"]
    head = (
        f"{cfg['points']:,} metric points from {cfg['sites']} sites ({len(KEYS)} values per event), into SQLite;"
        f" medians of {cfg['repeats']} repeat(s), alternating order\n\n"
    )
    rows = [
        "| writer | points/s (min-max) | lost per repeat | save() per event | full GCs per repeat (seconds, median) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, label in (("ours", "this project's tracker"), ("flare", "FLARE's MLflowReceiver")):
        v = s[kind]
        p = v["points_per_s"]
        rows.append(
            f"| {label} | {p['median']:,.0f} ({p['min']:,.0f}-{p['max']:,.0f}) | {v['lost']} |"
            f" {v['save_us_per_event']['median']:.0f} µs |{gc_cell(v)}"
        )
    for kind, label in (("ours", "this project's tracker"), ("flare", "FLARE's MLflowReceiver")):
        f = results.get("frozen", {}).get(kind)
        if f:
            rows.append(
                f"| {label}, `gc.freeze()` before the run (1 repeat) | {f['points_per_s']:,.0f} | {f['lost']} |"
                f" {f['save_us_per_event']:.0f} µs | {f['full_gcs']} ({f['full_gc_seconds']:.1f} s) |"
            )
    c = s["store_ceiling"]["points_per_s"]
    rows.append(
        f"| `MlflowClient.log_batch` alone, 1,000 per request | {c['median']:,.0f} ({c['min']:,.0f}-{c['max']:,.0f})"
        " | - | - | - |"
    )
    return head + "\n".join(rows) + "\n\n" + ratio_line(results["repeats"])


def ratio_line(reps) -> str:
    """Ours / FLARE's within each repeat (the two ran minutes apart at most) and of the medians."""
    each = [r["ours"]["points_per_s"] / r["flare"]["points_per_s"] for r in reps]
    ours, flare = (statistics.median(r[k]["points_per_s"] for r in reps) for k in ("ours", "flare"))
    return f"ours / FLARE's: per repeat {', '.join(f'{x:.2f}' for x in each)}; of the medians {ours / flare:.2f}"


def gc_cell(v) -> str:
    """The full-collection column (results written before it was measured have none)."""
    if "full_gc_seconds" not in v:
        return " - |"
    return f" {v['full_gcs']} ({v['full_gc_seconds']['median']:.1f} s) |"
