"""FL wall time against the physical floor, where start-up and shutdown go, and the cost of tracking.

The floor is the same sites' compute in parallel plain-Lightning processes, one per site, with
the threads each site gets in the simulator (usable cores // sites): nothing of FLARE, imports
and data loading outside the timed part (floor_site.py: each round's validation of the model
received, training, and Lightning's validation of the trained model). fit_floor_s is the floor
as measured before 2026-12-06 afternoon: one Trainer's fit, where a round's closing validation
stands in for the next round's opening one, so rounds - 1 of the job's validations are missing.
Against it runs the default job in the simulator with per-step metrics streamed (tracking on)
and with no logger on the sites (off). They are interleaved `repeats` times; medians and spreads
are reported, ratios taken within each repeat.

The machine's speed drifts by 10 to 20% within minutes (benchmarks/README.md), more than the
rounds / floor target's margin, so a floor measured once beside the job compares two different
machines. Each repeat measures the floor twice, right before and right after the tracking-on run
(floor, on, floor, off; the next repeat off, floor, on, floor): the run's floor is the mean of the
two, which cancels a steady drift, and their ratio (floor_drift) shows how far the machine moved.
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import REPO, federated, first_time, last_time, make_data, say, spread
from round_anatomy import anatomy, run_lines

# (phase, the log line that ends it, first or last such line); a missing line folds the phase
# into the next one. "launch" is flctl simulate's start; the last phase ends when it returns.
PHASES = (
    ("simulator and server start", r"Round 0 started", "first"),
    ("site processes start", r"ClientTaskWorker started to run", "last"),
    ("sites import and load data", r"training starts", "first"),
    ("rounds", r"aggregating \d+ update\(s\) at round", "last"),
    ("end of training", r"Beginning model validation", "first"),
    ("cross-site evaluation", r"Saved validation result", "last"),
    ("sites end", r"End the Simulator run", "last"),
    ("model logging and last writes", r"MLflow: all written", "last"),
)


def settings(quick: bool) -> dict:
    if quick:
        return {"sites": 2, "rounds": 2, "epochs": 1, "train_size": 6000, "repeats": 1}
    # 60,000 images: a floor of at least 60 s of training, so fixed costs weigh as in real jobs
    return {"sites": 2, "rounds": 5, "epochs": 1, "train_size": 60000, "repeats": 3}


def phases(lines, launched: float, ended: float) -> dict:
    """Seconds per phase, from the simulator log's time stamps."""
    out, previous = {}, launched
    for name, pattern, which in PHASES:
        t = (first_time if which == "first" else last_time)(lines, pattern)
        if t is None or t < previous:
            continue
        out[name] = t - previous
        previous = t
    out["teardown"] = ended - previous
    return out


def floor(work: Path, data_root, sites: int, rounds: int, epochs: int) -> dict:
    from fl_lightning_mlflow.site.threads import usable_cores

    threads = max(1, usable_cores() // sites)
    folder = work / f"floor-{time.time_ns()}"
    folder.mkdir(parents=True)
    names = [f"site-{i}" for i in range(1, sites + 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "floor_site.py"), str(data_root), s, str(rounds), str(epochs)]
            + [str(threads), str(folder)],
            stdout=subprocess.DEVNULL,
            stderr=open(folder / f"{s}.log", "w"),  # noqa: SIM115 - closed with the process
        )
        for s in names
    ]
    try:
        deadline = time.time() + 600
        while not all((folder / f"{s}.ready").exists() for s in names):
            if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
                raise RuntimeError(f"floor: a site process failed before training; see {folder}/*.log")
            time.sleep(0.05)
        go = time.time()
        (folder / "go").touch()
        for p in procs:
            if p.wait(timeout=1800) != 0:
                raise RuntimeError(f"floor: a site process failed; see {folder}/*.log")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    import json

    times = {s: json.loads((folder / f"{s}.json").read_text()) for s in names}
    return {
        "floor_s": max(t["ended"] for t in times.values()) - go,
        "fit_floor_s": max(t["fit_ended"] for t in times.values()) - go,
        "per_site_s": {s: t["ended"] - t["started"] for s, t in times.items()},
        "per_site_cpu_s": {s: t["cpu_s"] for s, t in times.items()},
        "threads_per_site": threads,
    }


def bracketed(floors: list) -> dict:
    """The floor of the run between floors[0] and floors[1]: the mean of the two, with their ratio
    (floor_drift, second / first: above 1 the machine slowed down between them)."""
    out = {key: statistics.fmean(f[key] for f in floors) for key in ("floor_s", "fit_floor_s")}
    out["floor_drift"] = floors[-1]["floor_s"] / floors[0]["floor_s"]
    return out


def run(work: Path, quick: bool, results: dict, save) -> dict:
    cfg = results.setdefault("config", settings(quick))
    data = make_data(work / "overhead-data", cfg["train_size"], cfg["sites"])
    reps = results.setdefault("repeats", [])
    # The tracking-on run between two floors (module docstring); off first every other repeat.
    orders = (("floor", "on", "floor", "off"), ("off", "floor", "on", "floor"))
    while len(reps) < cfg["repeats"]:
        i = len(reps)
        rep = {"order": list(orders[i % 2]), "floors": []}
        for kind in rep["order"]:
            if kind == "floor":
                f = floor(work, data, cfg["sites"], cfg["rounds"], cfg["epochs"])
                rep["floors"].append(f)
                say(
                    f"    repeat {i + 1}: floor {f['floor_s']:.1f} s (one Trainer's fit alone {f['fit_floor_s']:.1f} s)"
                )
                continue
            tracking = kind == "on"
            fed = federated(
                work,
                data,
                cfg["sites"],
                cfg["rounds"],
                cfg["epochs"],
                name=f"overhead-{kind}-{i}",
                extra={"client.tracking": tracking, "client.log_every_n_steps": 1},
            )
            fed["phases"] = phases(fed.pop("_lines"), fed["started"], fed["started"] + fed["wall_s"])
            fed["round_anatomy"] = anatomy(run_lines(Path(fed["log"])))  # the sites' own logs name the site
            rep[f"tracking_{kind}"] = fed
            say(
                f"    repeat {i + 1}: tracking {kind}: wall {fed['wall_s']:.1f} s = start-up {fed['startup_s']:.1f}"
                f" + rounds {fed['rounds_s']:.1f} + shutdown {fed['shutdown_s']:.1f}"
            )
        rep["floor"] = bracketed(rep["floors"])
        reps.append(rep)
        save()
    results["summary"] = summary(reps)
    save()
    return results


def summary(reps) -> dict:
    on = [r["tracking_on"] for r in reps]
    off = [r["tracking_off"] for r in reps]
    floors = [r["floor"]["floor_s"] for r in reps]
    names = [p for p, _, _ in PHASES] + ["teardown"]
    return {
        "floor_s": spread(floors),
        "wall_on_s": spread([f["wall_s"] for f in on]),
        "wall_over_floor": spread([f["wall_s"] / fl for f, fl in zip(on, floors, strict=True)]),
        "rounds_over_floor": spread([f["rounds_s"] / fl for f, fl in zip(on, floors, strict=True)]),
        # against the floor as measured before (fit alone, rounds - 1 validations short); absent in older files
        "rounds_over_fit_floor": spread(
            [f["rounds_s"] / r["floor"]["fit_floor_s"] for f, r in zip(on, reps, strict=True)]
        )
        if all("fit_floor_s" in r["floor"] for r in reps)
        else None,
        # seconds of the rounds beyond each round's slowest site task (round_anatomy.py); absent in older files
        "beyond_slowest_tasks_s": spread([f["round_anatomy"]["beyond_slowest_tasks_s"] for f in on])
        if all(f.get("round_anatomy") for f in on)
        else None,
        # second floor / first around the tracking-on run; absent in files from before the floor was bracketed
        "floor_drift": spread([r["floor"]["floor_drift"] for r in reps])
        if all("floor_drift" in r["floor"] for r in reps)
        else None,
        "fixed_s": spread([f["startup_s"] + f["shutdown_s"] for f in on]),
        "startup_s": spread([f["startup_s"] for f in on]),
        "shutdown_s": spread([f["shutdown_s"] for f in on]),
        "phases_s": {n: spread([f["phases"].get(n, 0.0) for f in on]) for n in names},
        "tracking_rounds": spread([a["rounds_s"] / b["rounds_s"] for a, b in zip(on, off, strict=True)]),
        "tracking_wall": spread([a["wall_s"] / b["wall_s"] for a, b in zip(on, off, strict=True)]),
        "tracking_site_fit": spread([a["site_fit_s"] / b["site_fit_s"] for a, b in zip(on, off, strict=True)]),
        "rounds_on_s": spread([f["rounds_s"] for f in on]),
        "rounds_off_s": spread([f["rounds_s"] for f in off]),
        "points_streamed": [f.get("tracked_points", 0) for f in on],
        "points_lost": [f.get("lost", 0) for f in on],
        "max_event_ms": max(f.get("max_event_ms", 0) for f in on),
    }


FLOOR_ROW = "floor: the sites' training in parallel processes, no FLARE"


def _fmt(s, unit="", digits=2) -> str:
    text = f"{s['median']:.{digits}f}{unit}"
    return text if s["n"] < 2 else f"{text} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f})"


def table(results) -> str:
    cfg, s = results["config"], results["summary"]
    head = (
        f"{cfg['sites']} sites x {cfg['rounds']} rounds x {cfg['epochs']} epoch(s), {cfg['train_size']:,} training"
        f" images; medians of {cfg['repeats']} interleaved repeat(s) (min, max)\n\n"
    )
    floor_row = FLOOR_ROW + (" (the mean of the two around the run)" if s.get("floor_drift") else "")
    rows = [
        (floor_row, _fmt(s["floor_s"], " s", 1), ""),
        ("FL wall time, tracking on (per-step metrics)", _fmt(s["wall_on_s"], " s", 1), ""),
        ("FL wall / floor", _fmt(s["wall_over_floor"]), "target <= 1.15"),
        ("FL rounds / floor", _fmt(s["rounds_over_floor"]), "target <= 1.10"),
        ("start-up + shutdown", _fmt(s["fixed_s"], " s", 1), "target <= 30 s"),
        ("tracking on / off: rounds", _fmt(s["tracking_rounds"], "", 3), "target <= 1.03"),
        ("tracking on / off: wall", _fmt(s["tracking_wall"], "", 3), ""),
        ("tracking on / off: summed site fit time", _fmt(s["tracking_site_fit"], "", 3), ""),
        ("metric points streamed / lost per run", f"{s['points_streamed']} / {s['points_lost']}", ""),
    ]
    if s.get("floor_drift"):
        rows.insert(1, ("the floor after the tracking-on run / before it (the machine's drift)",
                        _fmt(s["floor_drift"], "", 3), ""))  # fmt: skip
    if s.get("beyond_slowest_tasks_s"):
        rows.insert(4, (f"rounds beyond each round's slowest site task ({cfg['rounds']} rounds)",
                        _fmt(s["beyond_slowest_tasks_s"], " s"), ""))  # fmt: skip
    if s.get("rounds_over_fit_floor"):
        rows.insert(4, ("FL rounds / the fit alone (the floor before; rounds - 1 validations short)",
                        _fmt(s["rounds_over_fit_floor"]), ""))  # fmt: skip
    lines = ["| measure | value | target |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "Where the fixed seconds go (tracking on, medians):", "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {v['median']:.1f} |" for name, v in s["phases_s"].items()]
    if all(len(r.get("floors", [])) == 2 and r["tracking_on"].get("round_anatomy") for r in results["repeats"]):
        lines += ["", "Each repeat (tracking on unless marked off):", "", *repeat_rows(results["repeats"])]
    return head + "\n".join(lines)


def repeat_rows(reps) -> list:
    """One row per repeat of a bracketed run: its two floors, the rounds against their mean, the
    slowest site tasks (round_anatomy) and what the rounds hold beyond them, and the floor
    processes' CPU / wall time (1.00: they never waited, so a slower floor is a slower machine)."""
    rows = [
        "| repeat (order) | floors before, after s | floor s | rounds s | rounds / floor | slowest tasks s"
        " | slowest tasks / floor | beyond them s | rounds s, off | FL wall s | floor CPU / wall, lowest |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, r in enumerate(reps, start=1):
        on, fl, anatomy = r["tracking_on"], r["floor"]["floor_s"], r["tracking_on"]["round_anatomy"]
        tasks = sum(anatomy["slowest_task_s"])
        cpu = min(f["per_site_cpu_s"][s] / f["per_site_s"][s] for f in r["floors"] for s in f["per_site_s"])
        rows.append(
            f"| {i} ({', '.join(r['order'])}) | {r['floors'][0]['floor_s']:.1f}, {r['floors'][1]['floor_s']:.1f}"
            f" | {fl:.1f} | {on['rounds_s']:.1f} | {on['rounds_s'] / fl:.2f} | {tasks:.1f} | {tasks / fl:.2f}"
            f" | {anatomy['beyond_slowest_tasks_s']:.1f} | {r['tracking_off']['rounds_s']:.1f} | {on['wall_s']:.1f}"
            f" | {cpu:.3f} |"
        )
    return rows


def plot(results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.barh(1, s["floor_s"]["median"], color="#4c72b0", label="floor (training only)")
    left = 0.0
    colors = plt.get_cmap("tab10").colors
    for i, (name, v) in enumerate(s["phases_s"].items()):
        ax.barh(0, v["median"], left=left, color=colors[(i + 1) % 10], label=name)
        left += v["median"]
    ax.set_yticks([0, 1], ["FLARE job, tracking on", "parallel plain Lightning"])
    ax.set_xlabel("seconds (medians)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.42))
    ax.set_title("Where the time goes")
    fig.tight_layout()
    fig.savefig(out / "wall_time_breakdown.png", dpi=110)
    plt.close(fig)


def scaling(work: Path, quick: bool, results: dict, save) -> dict:
    """Sites, rounds and data size from a small base; wall time against the floor."""
    axes = {
        "sites": [(s, {"sites": s}) for s in ((2, 4) if quick else (2, 4, 8))],
        "rounds": [(r, {"rounds": r}) for r in ((2, 4) if quick else (2, 4, 8))],
        "train size": [(t, {"train_size": t}) for t in ((3000, 6000) if quick else (6000, 12000, 24000))],
    }
    base = {"sites": 2, "rounds": 2, "epochs": 1, "train_size": 6000}
    points = results.setdefault("points", [])
    done = {(p["axis"], p["x"]) for p in points}
    for axis, changes in axes.items():
        for x, change in changes:
            if (axis, x) in done:
                continue
            c = {**base, **change}
            data = make_data(work / f"scale-data-{c['train_size']}-{c['sites']}", c["train_size"], c["sites"])
            fl = floor(work, data, c["sites"], c["rounds"], c["epochs"])["floor_s"]
            fed = federated(
                work, data, c["sites"], c["rounds"], c["epochs"], name=f"scale-{axis}-{x}".replace(" ", "_")
            )
            fed.pop("_lines")
            points.append(
                {
                    "axis": axis,
                    "x": x,
                    "floor_s": fl,
                    **{k: fed[k] for k in ("wall_s", "startup_s", "rounds_s", "shutdown_s", "test_acc")},
                }
            )
            say(f"    {axis}={x}: wall {fed['wall_s']:.1f} s, rounds {fed['rounds_s']:.1f} s, floor {fl:.1f} s")
            save()
    return results


def scaling_table(results) -> str:
    rows = ["| change | wall s | start-up s | rounds s | shutdown s | floor s | test acc |", "| --- |" + " --- |" * 6]
    for p in results["points"]:
        rows.append(
            f"| {p['axis']} = {p['x']} | {p['wall_s']:.1f} | {p['startup_s']:.1f} | {p['rounds_s']:.1f} |"
            f" {p['shutdown_s']:.1f} | {p['floor_s']:.1f} | {p['test_acc']:.3f} |"
        )
    return "\n".join(rows)
