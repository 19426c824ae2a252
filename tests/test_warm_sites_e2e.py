"""More sites than simulator threads through flctl simulate: each site's worker is started once
and kept between its turns (flctl.warm_sites), and the job is tracked as with all sites at once."""

import re

import pytest

from conftest import JOB, tracked_runs
from flctl.simulate import simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def warm_run(offline_data, tmp_path_factory):
    """2 sites on 1 simulator thread, 2 rounds, cross-site evaluation of every model (the default):
    each site takes 7 turns (2 train, 1 submit_model, 4 validate)."""
    lines = []
    run = simulate(JOB, tmp_path_factory.mktemp("warm"), offline_data, sites=2, rounds=2, epochs=1, threads=1,
                   extra_settings={"client.batch_size": 128}, prepare=False, evaluate=False, say=lines.append,
                   show=None, timeout=900)  # fmt: skip
    return run, lines


def test_the_run_says_which_simulator_runs_it(warm_run):
    _, lines = warm_run
    assert any(line.startswith("running: python -m flctl.warm_simulator ") for line in lines)


def test_each_site_worker_is_started_once_and_serves_all_its_turns(warm_run):
    run, _ = warm_run
    for site in ("site-1", "site-2"):
        log = (run.run_dir / "simulator" / site / "log.txt").read_text()
        assert log.count("ClientTaskWorker started to run") == 1, site
        assert log.count("Finished one task run") >= 7, site  # every turn in that one process
        assert log.count(f"{site}: 2700 train / 300 val samples") == 1  # data loaded once
    assert "warm sites: 2 worker process(es) started in all" in run.log


def test_the_job_is_tracked_whole_as_with_all_sites_at_once(warm_run):
    run, _ = warm_run
    assert run.outcome.ok, run.outcome.problems
    assert run.outcome.lost == 0 and run.outcome.rounds_done == 2
    client, (parent,), sites = tracked_runs(run.server_dir)
    assert parent.info.status == "FINISHED" and set(sites) == {"site-1", "site-2"}
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "global_val_acc")] == [0, 1]
    assert all(r.info.status == "FINISHED" for r in sites.values())
    # every site's model and the global models were cross-site evaluated: 2 sites x (2 + 2) results
    assert len(re.findall(r"Saved validation result from client", run.log)) == 8


def test_one_site_at_a_time_gets_all_the_cores(warm_run):
    import os

    run, _ = warm_run
    assert run.log.count(f"{len(os.sched_getaffinity(0))} torch thread(s)") == 2
