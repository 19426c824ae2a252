"""One site floods (issue 21): the same job with and without the flood, interleaved.

3 sites x 4 rounds of the CIFAR-10 job on the offline images; in the flooded run site-3 streams
1.5 million points in a burst at its first task (tests/flood_job.py, the slow test's own job).
Per run: the wall time of `flctl simulate` (launch to its return), what the quiet sites' runs
and the parent run hold (metric series and their points, system metrics aside), and site-3's
delivery row (sent, throttled, written, lost). The figures: flooded wall / quiet wall (target at
most 1.5) and whether the quiet sites and the parent hold the same points in both.
"""

import json
import statistics
import sys
import time

from bench_common import REPO, say

sys.path.insert(0, str(REPO / "tests"))  # the job the slow test runs: one definition of the scenario


def settings(quick: bool) -> dict:
    return {"repeats": 1 if quick else 2}


def held(server_dir) -> dict:
    """{run: {metric: points}} for the parent and the quiet sites, system metrics and the flooding
    site's own delivery account (its throttled counts) aside."""
    from conftest import tracked_runs
    from flood_job import FLOOD_SITE

    client, (parent,), sites = tracked_runs(server_dir)
    out = {}
    for name, run in [("parent", parent), ("site-1", sites["site-1"]), ("site-2", sites["site-2"])]:
        keys = [k for k in run.data.metrics if not k.startswith(("system/", f"delivery/{FLOOD_SITE}/"))]
        out[name] = {k: len(client.get_metric_history(run.info.run_id, k)) for k in keys}
    return out


def one(work, data_root, flood: bool, i: int) -> dict:
    from flctl.simulate import simulate
    from flood_job import ROUNDS, SITES, flood_job

    job = flood_job(work / f"job-{flood}-{i}", data_root, flood)
    started = time.monotonic()
    run = simulate(job, work / f"ws-{flood}-{i}", data_root, sites=SITES, rounds=ROUNDS, epochs=1, prepare=False,
                   check=False, evaluate=False, say=lambda msg: None, show=None, timeout=1800)  # fmt: skip
    wall = time.monotonic() - started
    stats = json.loads((run.server_dir / "mlflow_tracking_stats.json").read_text())
    return {"flood": flood, "ok": run.outcome.ok, "wall_s": wall, "held": held(run.server_dir),
            "delivery": stats.get("delivery"), "status": stats.get("status")}  # fmt: skip


def run(work, quick: bool, results: dict, save) -> dict:
    from flctl import data_prep
    from flood_job import SITES

    data_root = work / "flood-data"
    data_prep.prepare(data_root, sites=SITES, offline=True, say=lambda msg: None)
    results.setdefault("runs", [])
    for i in range(settings(quick)["repeats"]):
        for flood in (False, True):  # interleaved: the machine's drift falls on both
            say(f"flood: repeat {i + 1}, flood={flood}")
            results["runs"].append(one(work / "flood", data_root, flood, i))
            save()
    quiet = [r for r in results["runs"] if not r["flood"]]
    flooded = [r for r in results["runs"] if r["flood"]]
    row = flooded[-1]["delivery"]["site-3"]
    results["summary"] = {
        "quiet_wall_s": statistics.median(r["wall_s"] for r in quiet),
        "flooded_wall_s": statistics.median(r["wall_s"] for r in flooded),
        "same_points": all(f["held"] == quiet[0]["held"] for f in flooded),
        "site3": {k: row[k] for k in ("sent", "throttled", "written", "lost")},
        "all_ok": all(r["ok"] for r in results["runs"]),
    }
    s = results["summary"]
    s["wall_ratio"] = s["flooded_wall_s"] / s["quiet_wall_s"]
    say(f"flood: wall {s['flooded_wall_s']:.1f} s vs {s['quiet_wall_s']:.1f} s ({s['wall_ratio']:.2f}x); "
        f"quiet sites and parent the same: {s['same_points']}; site-3 {s['site3']}")  # fmt: skip
    return results


def table(results) -> str:
    s = results["summary"]
    return "\n".join([
        "| | quiet job | flooded job |", "|---|---:|---:|",
        f"| wall (median), s | {s['quiet_wall_s']:.1f} | {s['flooded_wall_s']:.1f} |",
        f"\nflooded / quiet: {s['wall_ratio']:.2f}; quiet sites and parent hold the same points: {s['same_points']}; "
        f"site-3: {s['site3']}",
    ])  # fmt: skip
