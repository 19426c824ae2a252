"""One site floods, the others do not notice (issue 21): 3 sites x 4 rounds on the offline images,
site-3 streaming 1.5 million points in a burst at its first task. Against the same job without
the flood: the quiet sites' runs and the parent run hold exactly the same series, point for point
in number; site-3's surplus is counted as throttled (held back by its own budget), nothing is
lost, and the job completes. The two runs' times are printed, not asserted: the comparison with
a figure is the benchmark's (benchmarks/flood.py)."""

import json
import time

import pytest

from conftest import BATCH, LOG_EVERY, tracked_runs
from flctl import data_prep
from flctl.simulate import simulate
from flood_job import FLOOD_SITE, FLOOD_STEPS, FLOOD_VALUES, ROUNDS, SITES, flood_job

pytestmark = pytest.mark.slow


def run_job(tmp_path_factory, data_root, flood: bool):
    job = flood_job(tmp_path_factory.mktemp("flood-job"), data_root, flood)
    started = time.monotonic()
    settings = {"client.batch_size": BATCH, "client.log_every_n_steps": LOG_EVERY}
    run = simulate(job, tmp_path_factory.mktemp("flood-ws"), data_root, sites=SITES, rounds=ROUNDS, epochs=1,
                   extra_settings=settings, prepare=False, check=False, evaluate=False, say=lambda msg: None,
                   show=None, timeout=900)  # fmt: skip
    assert run.outcome.ok, (run.outcome.problems, run.log[-3000:])
    print(f"flood={flood}: {time.monotonic() - started:.1f} s")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data_root = tmp_path_factory.mktemp("flood-data") / "offline-cifar10"
    data_prep.prepare(data_root, sites=SITES, offline=True, say=lambda msg: None)  # the offline images, 3 sites
    return run_job(tmp_path_factory, data_root, False), run_job(tmp_path_factory, data_root, True)


def series(client, run) -> dict:
    """{metric: points} of a run, system metrics left out (their number follows the wall time)."""
    keys = [k for k in run.data.metrics if not k.startswith("system/")]
    return {k: len(client.get_metric_history(run.info.run_id, k)) for k in keys}


def test_the_quiet_sites_and_the_parent_hold_exactly_what_they_hold_without_the_flood(runs):
    quiet, flooded = runs
    q_client, (q_parent,), q_sites = tracked_runs(quiet.server_dir)
    f_client, (f_parent,), f_sites = tracked_runs(flooded.server_dir)
    for site in ("site-1", "site-2"):
        assert series(f_client, f_sites[site]) == series(q_client, q_sites[site]), site
    parent_quiet, parent_flooded = series(q_client, q_parent), series(f_client, f_parent)
    own = f"delivery/{FLOOD_SITE}/"  # the flooding site's own account differs, by design (its throttled counts)
    assert {k: n for k, n in parent_flooded.items() if not k.startswith(own)} == {
        k: n for k, n in parent_quiet.items() if not k.startswith(own)
    }
    assert parent_flooded["global_val_acc"] == ROUNDS


def test_the_flooding_sites_surplus_is_throttled_and_nothing_is_lost(runs):
    _, flooded = runs
    stats = json.loads((flooded.server_dir / "mlflow_tracking_stats.json").read_text())
    table = stats["delivery"]
    assert all(row["lost"] == 0 and row["written"] == row["sent"] for row in table.values()), table
    row = table[FLOOD_SITE]
    burst = FLOOD_STEPS * FLOOD_VALUES
    assert row["throttled"] > burst // 2 and row["sent"] + row["throttled"] >= burst, row
    assert table["site-1"]["throttled"] == table["site-2"]["throttled"] == 0
    client, _, sites = tracked_runs(flooded.server_dir)
    assert int(sites[FLOOD_SITE].data.tags["throttled_points"]) == row["throttled"]
    assert "throttled_points" not in sites["site-1"].data.tags
