"""Many sites on few simulator threads (issue 26): wall time by sites, threads and cross-site setting.

The default job on the offline images (6,000 training images split over the sites), 2 rounds of 1
epoch, through flctl simulate's own path. Two parts:

- scaling: sites 2, 4, 8, 16, each with all sites at once (`--threads` = sites) and on 2 threads
  (flctl's default there: each site's worker kept between its turns, flctl.warm_sites), cross-site
  evaluation as the job's default (every site's model and the global models). Per run the wall
  time, the sites' summed fit seconds (the `steps in S s` of every train task) and the seconds
  each site adds beyond its training: (wall - fit / sites at once) / sites.
- at the most sites: all at once and on 2 threads, with cross-site evaluation of every model and
  of the global models only, and FLARE's own turns (a new worker per task, `--cold-turns`) on 2
  threads with the global models only (with every model it takes about 14 minutes here). The
  ratios: 2 threads / all at once, per cross-site setting, and 2 threads (global models only) /
  all at once (every model). Cases run in a rotating order; one repeat (--repeats for more).
"""

import statistics

from bench_common import federated, make_data, say

CASES = (  # (name, threads: "all" or a number, cross_site_models, FLARE's own turns)
    ("all-at-once/all", "all", "all", False),
    ("2-threads/all", 2, "all", False),
    ("all-at-once/global", "all", "global", False),
    ("2-threads/global", 2, "global", False),
    ("2-threads-cold/global", 2, "global", True),
)


def settings(quick: bool) -> dict:
    if quick:
        return {"sites": [2, 4], "rounds": 2, "train_size": 3000, "repeats": 1, "cold": True}
    return {"sites": [2, 4, 8, 16], "rounds": 2, "train_size": 6000, "repeats": 1, "cold": True}


def one(work, data, sites: int, rounds: int, threads, cross: str, cold: bool, name: str) -> dict:
    t = sites if threads == "all" else threads
    fed = federated(work, data, sites, rounds, 1, name=name, threads=t, cold_turns=cold,
                    extra={"server.cross_site_models": cross})  # fmt: skip
    fed.pop("_lines")
    at_once = min(t, sites)
    fed["added_per_site_s"] = (fed["wall_s"] - fed["site_fit_s"] / at_once) / sites
    return {k: fed[k] for k in ("wall_s", "site_fit_s", "added_per_site_s", "test_acc", "log")}


def run(work, quick: bool, results: dict, save) -> dict:
    cfg = results.setdefault("config", settings(quick))
    most = max(cfg["sites"])
    data = {n: make_data(work / f"sites-data-{n}", cfg["train_size"], n) for n in cfg["sites"]}
    scaling = results.setdefault("scaling", {})
    for n in cfg["sites"]:
        for threads in ("all", 2):
            key = f"{n}/{threads}"
            if key not in scaling and (n > 2 or threads == "all"):  # 2 sites on 2 threads is all at once
                scaling[key] = one(work, data[n], n, cfg["rounds"], threads, "all", False, f"scale-{n}-{threads}")
                say(f"    {n} sites, threads {threads}: wall {scaling[key]['wall_s']:.1f} s, "
                    f"{scaling[key]['added_per_site_s']:.1f} s added per site")  # fmt: skip
                save()
    reps = results.setdefault("repeats", [])
    while len(reps) < cfg["repeats"]:
        i = len(reps)
        cases = [c for c in CASES if cfg.get("cold", True) or not c[3]]  # "cold": False skips FLARE's own turns
        order = cases[i % len(cases) :] + cases[: i % len(cases)]
        rep = {"order": [c[0] for c in order]}
        for name, threads, cross, cold in order:
            if name == "all-at-once/all" and i == 0 and f"{most}/all" in scaling:
                rep[name] = scaling[f"{most}/all"]  # the scaling part's own run
            elif name == "2-threads/all" and i == 0 and f"{most}/2" in scaling:
                rep[name] = scaling[f"{most}/2"]
            else:
                rep[name] = one(work, data[most], most, cfg["rounds"], threads, cross, cold, f"{name}-{i}")
            say(f"    {most} sites, {name}: wall {rep[name]['wall_s']:.1f} s")
        reps.append(rep)
        save()
    results["summary"] = summary(reps)
    save()
    return results


def summary(reps) -> dict:
    med = {name: statistics.median(r[name]["wall_s"] for r in reps) for name, *_ in CASES if name in reps[0]}
    out = {
        "wall_s_median": med,
        "ratio_2_threads_all": med["2-threads/all"] / med["all-at-once/all"],
        "ratio_2_threads_global": med["2-threads/global"] / med["all-at-once/global"],
        "ratio_2_threads_global_to_all_at_once_all": med["2-threads/global"] / med["all-at-once/all"],
    }
    if "2-threads-cold/global" in med:
        out["ratio_cold_to_warm_global"] = med["2-threads-cold/global"] / med["2-threads/global"]
    return out


def table(results) -> str:
    rows = [
        "| sites | threads | wall s | fit s (all sites) | s added per site |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, r in results.get("scaling", {}).items():
        n, threads = key.split("/")
        rows.append(f"| {n} | {threads} | {r['wall_s']:.1f} | {r['site_fit_s']:.1f} | {r['added_per_site_s']:.2f} |")
    s = results.get("summary")
    if s:
        rows += ["", "| at the most sites | wall s (median) |", "| --- | ---: |"]
        rows += [f"| {name} | {v:.1f} |" for name, v in s["wall_s_median"].items()]
        rows += ["", f"2 threads / all at once: {s['ratio_2_threads_all']:.2f} (every model cross-site evaluated; "
                 f"target at most 2), {s['ratio_2_threads_global']:.2f} (global models only; target at most 1.2); "
                 f"2 threads with global models only / all at once with every model: "
                 f"{s['ratio_2_threads_global_to_all_at_once_all']:.2f}"]  # fmt: skip
        if "ratio_cold_to_warm_global" in s:
            rows[-1] += f"; FLARE's own turns / kept workers (global models only): {s['ratio_cold_to_warm_global']:.2f}"
    return "\n".join(rows)


def plot(results, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for threads, label in (("all", "all sites at once"), ("2", "2 threads (workers kept)")):
        pts = sorted((int(k.split("/")[0]), r["wall_s"]) for k, r in results.get("scaling", {}).items()
                     if k.split("/")[1] == threads)  # fmt: skip
        if threads == "2":  # 2 sites on 2 threads is the all-at-once run
            pts = sorted(pts + [(int(k.split("/")[0]), r["wall_s"]) for k, r in results["scaling"].items()
                                if k == "2/all"])  # fmt: skip
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("sites")
    ax.set_ylabel("wall time (s)")
    ax.set_title("Sites, 2 rounds, cross-site evaluation of every model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "many_sites.png", dpi=110)
    plt.close(fig)
