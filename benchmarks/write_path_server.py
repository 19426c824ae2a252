"""The write path into the store users deploy: an `mlflow server` on PostgreSQL, on 127.0.0.1.

The same stream and entry point as write_path.py (save(fl_ctx, shareable, site) from START_RUN to
the end of END_RUN, every point counted back), into one `mlflow server` with WORKERS worker
processes on a local PostgreSQL (flctl.pg_mlflow_server: the rehearsal's launcher without its
network namespaces and basic auth). Rows: this project's tracker with its default for a server
(4 requests in flight, each for another run) and with one writer, FLARE's MLflowReceiver, and
log_batch alone at 1,000 metrics a request, one at a time and 4 at once (each into its own run).
Each receiver writes into an experiment of its own on the same server; the order rotates per
repeat, so a table that grows is no one's handicap. The server is started once for the section.

BENCH_TRACKING_SERVER=http://host:port measures an mlflow server that runs elsewhere instead (on
cores of its own, as deployed; credentials from MLFLOW_TRACKING_USERNAME / _PASSWORD): nothing is
started, and its CPU is not metered from here. Every repeat writes new experiments on it.
"""

import os
import threading
import time
from contextlib import nullcontext
from types import SimpleNamespace

from bench_common import say, spread
from write_path import feed, ratio_line, settings, store_ceiling, stream

WORKERS = 4  # the server's worker processes (uvicorn): requests it serves at once
ELSEWHERE = "BENCH_TRACKING_SERVER"  # an mlflow server on another host, measured instead of a local one
KINDS = {"ours": None, "ours_writers_1": 1, "flare": None}  # kind -> our writers (None: the default)
LABELS = {
    "ours": "this project's tracker, default writers (4 to a server)",
    "ours_writers_1": "this project's tracker, writers=1",
    "flare": "FLARE's MLflowReceiver",
}


def parallel_ceiling(uri: str, points: int, threads: int, experiment: str) -> dict:
    """log_batch alone, 1,000 metrics a request, threads requests at once (each its own run)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(experiment)
    runs = [client.create_run(exp).info.run_id for _ in range(threads)]
    now, per = int(time.time() * 1000), points // threads // 1000
    batches = [[Metric("m", 0.5, now, b * 1000 + i) for i in range(1000)] for b in range(per)]

    def send(run_id):
        for batch in batches:
            client.log_batch(run_id, metrics=batch)

    workers = [threading.Thread(target=send, args=(r,)) for r in runs]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    return {"points": per * 1000 * threads, "seconds": elapsed, "points_per_s": per * 1000 * threads / elapsed}


def elsewhere_problem(uri: str):
    """Why ELSEWHERE's value cannot be measured (one line), or None."""
    from fl_lightning_mlflow.server.tracking_uri import redact_uri

    if uri.startswith(("http://", "https://")):
        return None
    return f"{ELSEWHERE} must be the http(s):// address of an mlflow server, got {redact_uri(uri)!r}"


def run(work, quick: bool, results: dict, save) -> dict:
    from fl_lightning_mlflow.server.tracking_uri import redact_uri
    from flctl.errors import CliError
    from flctl.local_postgres import cannot_run
    from flctl.pg_mlflow_server import pg_mlflow_server

    elsewhere = os.environ.get(ELSEWHERE, "").strip()
    why = elsewhere_problem(elsewhere) if elsewhere else cannot_run()
    if why:
        say(f"    server store skipped: {why}")
        results["skipped"] = why
        save()
        return results
    results.pop("skipped", None)
    where = {"server_uri": redact_uri(elsewhere)} if elsewhere else {}
    cfg = results.setdefault("config", {**settings(quick), "server_workers": None if elsewhere else WORKERS, **where})
    if cfg.get("server_uri") != where.get("server_uri"):
        was, now = (c.get("server_uri") or "the local PostgreSQL" for c in (cfg, where))
        raise RuntimeError(f"the server store part of this results file measured {was}, not {now}; use another --out")
    sites = [f"site-{k + 1}" for k in range(cfg["sites"])]
    events = stream(cfg["sites"], cfg["points"])
    reps = results.setdefault("repeats", [])
    if len(reps) >= cfg["repeats"]:
        return summarize(results, save)
    try:
        # elsewhere: nothing to start, and no process of it to meter from here
        if elsewhere:
            server = nullcontext(SimpleNamespace(uri=elsewhere, cpu_seconds=None))
        else:
            server = pg_mlflow_server(workers=cfg["server_workers"])
        with server as stack:
            uri = stack.uri
            if elsewhere:
                say(f"    the mlflow server at {cfg['server_uri']} ({ELSEWHERE}); nothing started here")
            else:
                say(f"    mlflow server on PostgreSQL at {uri}, {cfg['server_workers']} workers")
            # Each worker process opens its store at its first request (seconds on a loaded machine):
            # paid here, not by whichever receiver goes first.
            for _ in range(2):
                parallel_ceiling(uri, 8 * 1000, 8, f"warm-up-{time.time_ns()}")
            while len(reps) < cfg["repeats"]:
                i, rep = len(reps), {}
                kinds = list(KINDS)
                for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
                    name = f"write-path-{kind}-{i}-{time.time_ns()}"
                    base = "flare" if kind == "flare" else "ours"
                    rep[kind] = feed(
                        base, work / name, events, sites, uri, name, writers=KINDS[kind], meter=stack.cpu_seconds
                    )
                    say(
                        f"    server, repeat {i + 1}: {kind}: {rep[kind]['points_per_s']:.0f} points/s, "
                        f"{rep[kind]['stored']} of {rep[kind]['points']} stored"
                    )
                stamp = time.time_ns()
                rep["store_ceiling"] = store_ceiling(work, cfg["points"], uri=uri, experiment=f"ceiling-{stamp}")
                rep["store_ceiling_4"] = parallel_ceiling(uri, cfg["points"], 4, f"ceiling4-{time.time_ns()}")
                say(
                    f"    server, repeat {i + 1}: log_batch alone: {rep['store_ceiling']['points_per_s']:.0f}"
                    f" points/s one at a time, {rep['store_ceiling_4']['points_per_s']:.0f} 4 at once"
                )
                reps.append(rep)
                save()
    except CliError as e:
        say(f"    server store failed: {e}")
        results["skipped"] = str(e)
        save()
        return results
    return summarize(results, save)


def summarize(results: dict, save) -> dict:
    reps = results["repeats"]
    results["summary"] = {
        kind: {
            "points_per_s": spread([r[kind]["points_per_s"] for r in reps]),
            "lost": [r[kind]["lost"] for r in reps],
            "save_us_per_event": spread([r[kind]["save_us_per_event"] for r in reps]),
            # Who did the work: CPU ms per 1,000 points stored, by process (the same work for every
            # receiver on the server's side: the rate is then what the machine's free cores allow).
            "cpu_ms_per_1000": {
                name: spread([r[kind]["cpu_seconds"][name] / r[kind]["stored"] * 1e6 for r in reps])["median"]
                for name in reps[0][kind].get("cpu_seconds", {})
            },
        }
        for kind in KINDS
    }
    for ceiling in ("store_ceiling", "store_ceiling_4"):
        results["summary"][ceiling] = {"points_per_s": spread([r[ceiling]["points_per_s"] for r in reps])}
    save()
    return results


def table(results) -> str:
    if "summary" not in results:
        return f"Server store not measured: {results.get('skipped', 'no results')}"
    cfg, s = results["config"], results["summary"]
    if cfg.get("server_uri"):
        where = f"into the mlflow server at {cfg['server_uri']} (another host's; not started here)"
    else:
        where = f"into `mlflow server` (--workers {cfg['server_workers']}) on PostgreSQL, both on 127.0.0.1"
    head = (
        f"{cfg['points']:,} metric points from {cfg['sites']} sites, {where}; medians of {cfg['repeats']}"
        f" repeat(s), rotating order\n\n"
    )
    rows = [
        "| writer | points/s median (min-max) | lost per repeat | save() per event |"
        " CPU ms per 1,000 points: server, PostgreSQL, this process |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, label in LABELS.items():
        p, v = s[kind]["points_per_s"], s[kind]
        cpu = v.get("cpu_ms_per_1000", {})
        cells = ", ".join(f"{cpu[n]:.0f}" if n in cpu else "-" for n in ("mlflow", "postgres", "this process"))
        rows.append(
            f"| {label} | {p['median']:,.0f} ({p['min']:,.0f}-{p['max']:,.0f}) | {v['lost']} |"
            f" {v['save_us_per_event']['median']:.0f} µs | {cells} |"
        )
    for ceiling, label in (("store_ceiling", "one at a time"), ("store_ceiling_4", "4 at once, each its own run")):
        p = s[ceiling]["points_per_s"]
        rows.append(
            f"| `log_batch` alone, 1,000 per request, {label} | {p['median']:,.0f} ({p['min']:,.0f}-{p['max']:,.0f})"
            " | - | - | - |"
        )
    return head + "\n".join(rows) + "\n\n" + ratio_line(results["repeats"])
