"""The benchmark code's own logic, on made-up inputs (no benchmark runs here: no timing is asserted)."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402
import overhead  # noqa: E402
import round_anatomy  # noqa: E402
import run_benchmarks  # noqa: E402
import write_path  # noqa: E402
from bench_common import spread  # noqa: E402


def stamp(seconds: float) -> str:
    whole = int(seconds)
    return f"2026-11-30 10:00:{whole:02d},{int((seconds - whole) * 1000):03d} - INFO - "


def test_phases_follow_the_log_and_fold_a_missing_marker_into_the_next():
    launched = __import__("datetime").datetime(2026, 11, 30, 10, 0, 0).timestamp()
    lines = [
        stamp(5) + "Round 0 started.",
        stamp(7) + "ClientTaskWorker started to run",
        stamp(15) + "round 0: training starts",
        stamp(40) + "aggregating 2 update(s) at round 1",
        stamp(41) + "Beginning model validation with clients",
        stamp(45) + "Saved validation result from client 'site-1'",
        # no "End the Simulator run": that phase folds into the next
        stamp(52) + "MLflow: all written",
    ]
    got = overhead.phases(lines, launched, launched + 55)
    assert got["simulator and server start"] == pytest.approx(5)
    assert got["sites import and load data"] == pytest.approx(8)
    assert got["rounds"] == pytest.approx(25)
    assert "sites end" not in got and got["model logging and last writes"] == pytest.approx(7)
    assert got["teardown"] == pytest.approx(3)
    assert sum(got.values()) == pytest.approx(55)


def test_accuracy_summary_and_table_give_mean_and_spread_per_cell():
    results = {
        "config": {"sites": 3, "rounds": 4, "seeds": [0, 1], "splits": ["iid", "dirichlet_0.1"]},
        "cells": {
            "FedAvg/iid/0": {"test_acc": 0.6},
            "FedAvg/iid/1": {"test_acc": 0.7},
            "FedAvg/dirichlet_0.1/0": {"test_acc": 0.4},
        },
        "central": {"lr": 0.02, "runs": {"0": {"test_acc": 0.75}, "1": {"test_acc": 0.73}}},
    }
    results["summary"] = accuracy.summary(results)
    assert results["summary"]["FedAvg/iid"]["mean"] == pytest.approx(0.65)
    assert results["summary"]["FedAvg/dirichlet_0.1"]["n"] == 1
    assert "SCAFFOLD/iid" not in results["summary"]
    text = accuracy.table(results)
    assert "| FedAvg | 0.650 ± 0.071 (0.600-0.700) | 0.400 ± 0.000 (0.400-0.400) |" in text
    assert "| SCAFFOLD | - | - |" in text and "lr 0.02" in text


def test_spread_of_one_value_has_no_deviation():
    assert spread([2.0]) == {"n": 1, "median": 2.0, "mean": 2.0, "min": 2.0, "max": 2.0, "stdev": 0.0, "values": [2.0]}


def test_an_unknown_section_is_named():
    with pytest.raises(argparse.ArgumentTypeError, match="unknown section.*'accuracyy'"):
        run_benchmarks.sections_arg("overhead,accuracyy")


def test_the_stream_interleaves_sites_in_flare_analytics_events():
    from nvflare.apis.analytix import AnalyticsData, LogWriterName
    from nvflare.apis.dxo import from_shareable

    events = write_path.stream(sites=2, points=2 * 2 * len(write_path.KEYS))
    assert [site for site, _ in events] == ["site-1", "site-2", "site-1", "site-2"]
    data = AnalyticsData.from_dxo(from_shareable(events[2][1]), receiver=LogWriterName.MLFLOW)
    assert data.step == 1 and set(data.value) == set(write_path.KEYS)


def test_many_sites_summary_gives_the_issues_ratios_and_the_table_every_run(tmp_path):
    import many_sites
    import site_turn

    run = {"wall_s": 100.0, "site_fit_s": 32.0, "added_per_site_s": 5.0, "test_acc": 0.9, "log": "x"}
    rep = {
        name: {**run, "wall_s": wall}
        for (name, *_), wall in zip(many_sites.CASES, (100, 180, 90, 99, 400), strict=True)
    }
    s = many_sites.summary([rep])
    assert s["ratio_2_threads_all"] == pytest.approx(1.8) and s["ratio_2_threads_global"] == pytest.approx(1.1)
    assert s["ratio_2_threads_global_to_all_at_once_all"] == pytest.approx(0.99)
    assert s["ratio_cold_to_warm_global"] == pytest.approx(400 / 99)
    rep.pop("2-threads-cold/global")  # "cold": False skips FLARE's own turns
    assert "ratio_cold_to_warm_global" not in many_sites.summary([rep])
    table = many_sites.table({"scaling": {"16/all": run, "16/2": {**run, "wall_s": 180.0}}, "summary": s})
    assert "| 16 | 2 | 180.0 | 32.0 | 5.00 |" in table and "2 threads / all at once: 1.80" in table
    log = tmp_path / "simulator.log"
    log.write_text(
        "2026-12-06 08:00:00,000 - INFO - Simulate Run client: site-1 on GPU group: None\n"
        "2026-12-06 08:00:00,500 - INFO - Finished one task run for client: site-1 interval: 0.25\n"
        "2026-12-06 08:00:01,000 - INFO - Simulate Run client: site-2 on GPU group: None\n"
        "2026-12-06 08:00:02,000 - INFO - Finished one task run for client: site-2 interval: 0.25\n"
    )
    assert site_turn.kept_turns(tmp_path) == {"turns": 2, "worker_starts": 0, "turn_median_s": 0.75}


def test_the_server_store_table_gives_each_row_and_the_ratio_to_flares_receiver():
    import write_path_server

    def rep(ours, ours_1, flare, c1, c4):
        cpu = {"mlflow": 20.0, "postgres": 2.0, "this process": 4.0}  # seconds, for 100,000 points
        row = lambda rate: {"points_per_s": rate, "lost": 0, "save_us_per_event": 50.0, "stored": 100_000,  # noqa: E731
                            "cpu_seconds": cpu}  # fmt: skip
        return {"ours": row(ours), "ours_writers_1": row(ours_1), "flare": row(flare),
                "store_ceiling": {"points_per_s": c1}, "store_ceiling_4": {"points_per_s": c4}}  # fmt: skip

    results = {
        "config": {"sites": 4, "points": 100_000, "repeats": 2, "server_workers": 4},
        "repeats": [rep(4000, 2000, 2000, 2100, 4200), rep(6000, 2200, 2000, 2300, 4400)],
    }
    write_path_server.summarize(results, lambda: None)
    text = write_path_server.table(results)
    assert "`mlflow server` (--workers 4) on PostgreSQL" in text
    ours = "| this project's tracker, default writers (4 to a server) | 5,000 (4,000-6,000) | [0, 0] | 50 µs |"
    assert f"{ours} 200, 20, 40 |" in text
    assert "| FLARE's MLflowReceiver | 2,000 (2,000-2,000) |" in text
    assert text.endswith("ours / FLARE's: per repeat 2.00, 3.00; of the medians 2.50")
    assert write_path_server.table({"skipped": "PostgreSQL is not installed"}).endswith("PostgreSQL is not installed")

    results["config"]["server_uri"] = "https://tracking.example.org"
    assert "into the mlflow server at https://tracking.example.org (another host's; not started here)" in (
        write_path_server.table(results)
    )


def test_a_server_elsewhere_must_be_an_http_address_and_its_password_is_never_shown(monkeypatch, tmp_path):
    import write_path_server

    assert write_path_server.elsewhere_problem("http://10.0.0.5:5000") is None
    assert write_path_server.elsewhere_problem("https://tracking.example.org") is None
    line = write_path_server.elsewhere_problem("postgresql://fl:s3cret@db/mlflow")
    assert (
        line
        == "BENCH_TRACKING_SERVER must be the http(s):// address of an mlflow server, got 'postgresql://***@db/mlflow'"
    )
    # the section says so and starts nothing
    monkeypatch.setenv("BENCH_TRACKING_SERVER", "sqlite:////tmp/x.db")
    results = write_path_server.run(tmp_path, True, {}, lambda: None)
    assert results == {"skipped": write_path_server.elsewhere_problem("sqlite:////tmp/x.db")}


def test_a_results_file_of_one_server_is_not_continued_on_another(monkeypatch, tmp_path):
    import write_path_server

    monkeypatch.setenv("BENCH_TRACKING_SERVER", "http://10.0.0.5:5000")
    begun = {"config": {"sites": 4, "points": 20_000, "repeats": 1, "server_workers": 4}, "repeats": []}
    with pytest.raises(
        RuntimeError, match="measured the local PostgreSQL, not http://10.0.0.5:5000; use another --out$"
    ):
        write_path_server.run(tmp_path, True, begun, lambda: None)


def flare_line(seconds: float, who: str, text: str) -> str:
    """A FLARE log line as a site's or the server's log.txt holds it (identity names the process)."""
    return stamp(seconds).replace(" - INFO - ", f" - X - INFO - [identity={who}, run=simulate_job] - ") + text


def test_round_anatomy_splits_each_round_into_its_slowest_task_and_the_gaps_around_it():
    lines = [
        flare_line(0.5, "simulator_server", "Round 0 started."),  # before the sites' processes: start-up
        flare_line(1.0, "site-1", "round 0: training starts"),
        flare_line(1.2, "site-2", "round 0: training starts"),
        flare_line(9.0, "site-1", "round 0: train task took 8.0 s"),
        flare_line(10.2, "site-2", "round 0: train task took 9.0 s"),
        flare_line(10.5, "simulator_server", "aggregating 2 update(s) at round 0"),
        flare_line(10.6, "simulator_server", "Round 1 started."),
        flare_line(10.7, "site-2", "round 1: training starts"),
        flare_line(11.0, "site-1", "round 1: training starts"),
        flare_line(19.0, "site-1", "round 1: train task took 8.0 s"),
        flare_line(19.5, "site-2", "round 1: train task took 8.8 s"),
        flare_line(19.6, "simulator_server", "aggregating 2 update(s) at round 1"),
    ]
    got = round_anatomy.anatomy(lines)
    assert got["rounds"] == 2 and got["slowest_task_s"] == [9.0, 8.8]
    assert got["result_to_aggregation_s"] == pytest.approx([0.3, 0.1], abs=0.01)
    assert got["aggregation_to_next_start_s"] == pytest.approx([0.1], abs=0.01)
    assert got["start_to_last_site_s"] == pytest.approx([0.4], abs=0.01)  # round 1's only
    assert got["rounds_s"] == pytest.approx(18.6, abs=0.01)  # the first "training starts" to the last aggregation
    assert got["beyond_slowest_tasks_s"] == pytest.approx(18.6 - 17.8, abs=0.01)


def test_round_anatomy_of_a_log_without_rounds_is_empty():
    assert round_anatomy.anatomy([flare_line(1.0, "site-1", "round 0: training starts"), "no time stamp"]) == {}


def test_round_anatomy_adds_each_runs_anatomy_to_the_results_file_and_names_a_missing_log(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "simulator" / "server").mkdir(parents=True)
    (run_dir / "simulator" / "site-1").mkdir()
    (run_dir / "simulator" / "site-1" / "log.txt").write_text(
        flare_line(1.0, "site-1", "round 0: training starts")
        + "\n"
        + flare_line(5.0, "site-1", "round 0: train task took 4.0 s\n")
    )
    (run_dir / "simulator" / "server" / "log.txt").write_text(
        flare_line(5.5, "simulator_server", "aggregating 1 update(s) at round 0") + "\n"
    )
    results = tmp_path / "results.json"
    timings = {"wall_s": 10.0, "rounds_s": 4.5, "startup_s": 3.0, "shutdown_s": 2.5, "site_fit_s": 4.0, "phases": {}}
    on, off = {**timings, "log": str(run_dir)}, {**timings, "log": str(tmp_path / "gone")}
    repeat = {"floor": {"floor_s": 4.0, "fit_floor_s": 3.5}, "tracking_on": on, "tracking_off": off}
    results.write_text(json.dumps({"overhead": {"repeats": [repeat]}}))
    assert round_anatomy.main([str(results)]) == 0
    saved = json.loads(results.read_text())["overhead"]
    anatomy = saved["repeats"][0]["tracking_on"]["round_anatomy"]
    assert anatomy["beyond_slowest_tasks_s"] == pytest.approx(0.5, abs=0.01)  # 4.5 s of rounds, a 4.0 s task
    assert saved["summary"]["beyond_slowest_tasks_s"]["median"] == pytest.approx(0.5, abs=0.01)
    assert "round_anatomy" not in saved["repeats"][0]["tracking_off"]
    assert f"tracking_off: no log folder {tmp_path / 'gone'}" in capsys.readouterr().out


def overhead_run(rounds_s: float) -> dict:
    return {"wall_s": rounds_s + 40, "rounds_s": rounds_s, "startup_s": 25, "shutdown_s": 15, "site_fit_s": 70,
            "phases": {}}  # fmt: skip


def test_the_floor_of_a_run_is_the_mean_of_the_two_around_it_with_the_drift_between_them():
    before = {"floor_s": 80.0, "fit_floor_s": 76.0, "per_site_s": {}}
    after = {"floor_s": 72.0, "fit_floor_s": 68.0, "per_site_s": {}}
    got = overhead.bracketed([before, after])
    assert got["floor_s"] == pytest.approx(76.0) and got["fit_floor_s"] == pytest.approx(72.0)
    assert got["floor_drift"] == pytest.approx(0.9)  # the machine sped up by 10% between them
    reps = [{"floor": got, "tracking_on": overhead_run(83.6), "tracking_off": overhead_run(80.0)}]
    s = overhead.summary(reps)
    assert s["rounds_over_floor"]["median"] == pytest.approx(1.1)  # against 76, not 80 or 72
    assert s["floor_drift"]["median"] == pytest.approx(0.9)
    table = overhead.table({"config": overhead.settings(False), "summary": s, "repeats": reps})
    assert "| the floor after the tracking-on run / before it (the machine's drift) | 0.900 |" in table
    assert f"| {overhead.FLOOR_ROW} (the mean of the two around the run) | 76.0 s |" in table


def test_an_older_results_file_with_one_floor_per_repeat_still_sums_up():
    reps = [{"floor": {"floor_s": 80.0, "fit_floor_s": 76.0}, "tracking_on": overhead_run(88.0),
             "tracking_off": overhead_run(84.0)}]  # fmt: skip
    s = overhead.summary(reps)
    assert s["floor_drift"] is None and s["rounds_over_floor"]["median"] == pytest.approx(1.1)
    table = overhead.table({"config": overhead.settings(False), "summary": s, "repeats": reps})
    assert "drift" not in table and f"| {overhead.FLOOR_ROW} | 80.0 s |" in table


def test_each_bracketed_repeat_gets_a_row_with_its_two_floors_and_the_floors_lowest_cpu_share():
    def floor(seconds, cpu):
        return {"floor_s": seconds, "fit_floor_s": seconds - 4, "per_site_s": {"site-1": seconds, "site-2": 50.0},
                "per_site_cpu_s": {"site-1": seconds * cpu, "site-2": 50.0}}  # fmt: skip

    on = overhead_run(83.6) | {"round_anatomy": {"slowest_task_s": [40.0, 41.8], "beyond_slowest_tasks_s": 1.8}}
    floors = [floor(80.0, 0.99), floor(72.0, 0.95)]
    rep = {"order": ["floor", "on", "floor", "off"], "floors": floors, "floor": overhead.bracketed(floors),
           "tracking_on": on, "tracking_off": overhead_run(80.0)}  # fmt: skip
    text = overhead.table({"config": overhead.settings(False), "summary": overhead.summary([rep]), "repeats": [rep]})
    row = "| 1 (floor, on, floor, off) | 80.0, 72.0 | 76.0 | 83.6 | 1.10 | 81.8 | 1.08 | 1.8 | 80.0 | 123.6 | 0.950 |"
    assert text.endswith(row)
    del on["round_anatomy"]  # a repeat without its anatomy: no per-repeat table rather than a half one
    assert "Each repeat" not in overhead.table({"config": overhead.settings(False),
                                                 "summary": overhead.summary([rep]), "repeats": [rep]})  # fmt: skip


def test_summary_prints_a_kept_results_files_tables_and_names_a_file_it_cannot_use(tmp_path, capsys):
    kept = Path(__file__).resolve().parents[1] / "benchmarks" / "write-path-verify-2026-12-06.json"
    assert run_benchmarks.main(["--summary", str(kept)]) == 0
    out = capsys.readouterr().out
    assert "## Write path" in out and "### Write path on an mlflow server" in out
    assert "ours / FLARE's: per repeat 0.97, 1.08, 0.93; of the medians 0.98" in out
    assert not list(tmp_path.iterdir())  # nothing run, nothing written
    other = tmp_path / "turns.json"
    other.write_text(json.dumps({"runs": {}}))
    with pytest.raises(SystemExit, match=f"{other} holds no finished section"):
        run_benchmarks.main(["--summary", str(other)])
    (tmp_path / "torn.json").write_text("{")
    with pytest.raises(SystemExit, match="torn.json is not a readable results file: JSONDecodeError"):
        run_benchmarks.main(["--summary", str(tmp_path / "torn.json")])
