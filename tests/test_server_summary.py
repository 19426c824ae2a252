"""FederationSummary: per-round means weighted exactly as FLARE's IntimeModelSelector weighs,
cross-site matrix, best model and the final status."""

import math

import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContextManager
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector

from fl_lightning_mlflow.server.summary import FAILED, FINISHED, FederationSummary

KEY = "global_val_acc"
MODES = {KEY: "max", "global_val_loss": "min"}  # as the tracker gives them: the selector's mode, metric_modes


def test_round_points_are_the_step_weighted_mean_each_site_and_the_count():
    summary = FederationSummary(num_rounds=1, metric_modes=MODES)
    assert summary.add_contribution("site-2", 0, {KEY: 0.5, "global_val_loss": 2.0}, num_steps=300, current_round=0)
    assert summary.add_contribution("site-1", 0, {KEY: 0.9, "global_val_loss": 1.0}, num_steps=100, current_round=0)
    points = dict(summary.close_round(0))
    assert points[KEY] == pytest.approx((0.5 * 300 + 0.9 * 100) / 400)
    assert points["global_val_loss"] == pytest.approx((2.0 * 300 + 1.0 * 100) / 400)
    assert points[f"{KEY}/site-1"] == 0.9 and points[f"{KEY}/site-2"] == 0.5
    assert points["contributing_sites"] == 2.0
    # Fairness beside the mean: the worst site (lowest "max" accuracy, highest "min" loss) and the spread.
    assert points[f"{KEY}/worst_site"] == 0.5 and points[f"{KEY}/spread"] == pytest.approx(0.4)
    assert points["global_val_loss/worst_site"] == 2.0 and points["global_val_loss/spread"] == 1.0
    names = [name for name, _ in summary.close_round(1)]
    assert names == ["contributing_sites"]  # an empty round still says how many sites took part


def test_the_worst_site_follows_the_metric_modes_and_no_name_is_guessed():
    metrics = {
        "site-1": {"global_val_mse": 0.2, "global_val_r2": 0.9, "global_val_loss": 0.3, "global_val_score": 4.0},
        "site-2": {"global_val_mse": 0.6, "global_val_r2": 0.5, "global_val_loss": 0.1, "global_val_score": 1.0},
    }
    modes = {"global_val_mse": "min", "global_val_r2": "max", "global_val_loss": "max"}
    summary = FederationSummary(metric_modes=modes)
    for site, values in metrics.items():
        summary.add_contribution(site, 0, values, num_steps=10)
    points = dict(summary.close_round(0))
    assert points["global_val_mse/worst_site"] == 0.6  # "min": the highest value is the worst
    assert points["global_val_r2/worst_site"] == 0.5  # "max": the lowest
    assert points["global_val_loss/worst_site"] == 0.1  # its mode, not its name, says which way is worse
    # No mode: no worst site (nothing is guessed), but the spread is there for every metric.
    assert "global_val_score/worst_site" not in points and points["global_val_score/spread"] == 3.0
    assert {name: points[f"{name}/spread"] for name in modes} == pytest.approx(
        {"global_val_mse": 0.4, "global_val_r2": 0.4, "global_val_loss": 0.2}
    )
    # No modes at all: spreads only.
    summary = FederationSummary()
    for site, values in metrics.items():
        summary.add_contribution(site, 0, values, num_steps=10)
    names = [name for name, _ in summary.close_round(0)]
    assert not [name for name in names if name.endswith("/worst_site")]
    assert sum(name.endswith("/spread") for name in names) == 4


def test_without_weigh_by_local_iter_every_site_counts_once_times_its_aggregation_weight():
    summary = FederationSummary(weigh_by_local_iter=False, aggregation_weights={"site-1": 3.0})
    summary.add_contribution("site-1", 0, {KEY: 1.0}, num_steps=10)
    summary.add_contribution("site-2", 0, {KEY: 0.0}, num_steps=1000)
    assert dict(summary.close_round(0))[KEY] == pytest.approx(0.75)


def test_values_the_selector_skips_are_left_out_of_the_mean_but_shown_per_site():
    summary = FederationSummary(metric_modes=MODES)
    summary.add_contribution("site-1", 0, {KEY: 0.4}, num_steps=10)
    summary.add_contribution("site-2", 0, {KEY: math.nan}, num_steps=10)
    summary.add_contribution("site-3", 0, {KEY: "high"}, num_steps=10)
    summary.add_contribution("site-4", 0, {KEY: 0.9}, num_steps="many")  # no usable weight
    points = summary.close_round(0)
    assert dict(points)[KEY] == 0.4
    assert math.isnan(dict(points)[f"{KEY}/site-2"])
    assert f"{KEY}/site-3" not in dict(points) and dict(points)["contributing_sites"] == 4.0
    # Fairness over the finite numbers only: a NaN site neither is the worst nor widens the spread.
    assert dict(points)[f"{KEY}/worst_site"] == 0.4 and dict(points)[f"{KEY}/spread"] == pytest.approx(0.5)


def test_an_update_for_another_round_is_discarded_as_the_aggregator_does():
    summary = FederationSummary(num_rounds=2, metric_modes=MODES)
    summary.add_contribution("site-1", 0, {KEY: 0.5}, current_round=0)
    summary.close_round(0)
    assert not summary.add_contribution("site-2", 0, {KEY: 0.1}, current_round=1)  # late
    summary.add_contribution("site-1", 1, {KEY: 0.7}, current_round=1)
    assert dict(summary.close_round(1)) == {
        KEY: 0.7,
        f"{KEY}/site-1": 0.7,
        f"{KEY}/worst_site": 0.7,
        f"{KEY}/spread": 0.0,
        "contributing_sites": 1.0,
    }
    status, failure, sites = summary.outcome(["site-1", "site-2"])
    assert (status, failure) == (FINISHED, None)
    assert sites == {"site-1": FINISHED, "site-2": FAILED}  # site-2 missed the last round: dropped out


def _contribution(site, fl_round, value, steps):
    """A site's train result as the aggregator's BEFORE_CONTRIBUTION_ACCEPT sees it: real FLARE objects."""
    dxo = DXO(DataKind.WEIGHT_DIFF, data={"w": [0.0]})
    dxo.set_meta_prop(MetaKey.INITIAL_METRICS, {KEY: value, "global_val_loss": 1.0 - value})
    dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, steps)
    shareable = dxo.to_shareable()
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, fl_round)
    peer = FLContextManager(identity_name=site).new_context()
    peer.set_prop(FLContextKey.SHAREABLE, shareable, private=True)
    return peer, shareable


@pytest.mark.parametrize("aggregation_weights", [None, {"site-2": 0.25}])
def test_the_best_rounds_mean_is_the_selectors_value_to_the_last_bit(aggregation_weights):
    """Drive FLARE's own IntimeModelSelector (weigh_by_local_iter, as the jobs configure it) and the
    summary with the same updates: the per-round mean must equal the value the selector selects on,
    which the registered model version carries as key_metric_value."""
    selector = IntimeModelSelector(weigh_by_local_iter=True, aggregation_weights=aggregation_weights, key_metric=KEY)
    summary = FederationSummary(2, selector.weigh_by_local_iter, selector.aggregation_weights)
    fl_ctx = FLContextManager(identity_name="server").new_context()
    updates = {0: [("site-1", 0.1234567, 3117), ("site-2", 0.7654321, 1013)],
               1: [("site-2", 0.3333333, 1013), ("site-1", 0.6180339, 3117), ("site-3", math.inf, 50)]}  # fmt: skip
    for fl_round, sites in updates.items():
        fl_ctx.set_prop(AppConstants.CURRENT_ROUND, fl_round, private=True, sticky=False)
        fl_ctx.set_prop(AppConstants.VALIDATION_RESULT, None, private=True, sticky=False)
        selector.handle_event(AppEventType.ROUND_STARTED, fl_ctx)
        for site, value, steps in sites:
            peer, shareable = _contribution(site, fl_round, value, steps)
            fl_ctx.set_peer_context(peer)
            selector.handle_event(AppEventType.BEFORE_CONTRIBUTION_ACCEPT, fl_ctx)
            dxo = from_shareable(shareable)  # what the tracker reads, as it reads it
            metrics, steps = (
                dxo.get_meta_prop(MetaKey.INITIAL_METRICS),
                dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 1.0),
            )
            summary.add_contribution(
                site, shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND), metrics, steps, fl_round
            )
        selector.handle_event(AppEventType.BEFORE_AGGREGATION, fl_ctx)
        mean = dict(summary.close_round(fl_round))[KEY]
        if fl_round == 0:
            assert fl_ctx.get_prop(AppConstants.VALIDATION_RESULT) is None  # the selector skips round 0
        else:
            assert mean == fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)  # exact, not approx
            assert mean == selector.best_raw_val_metric
            summary.set_best(fl_round, fl_ctx.get_prop(AppConstants.VALIDATION_RESULT))
    assert summary.best == (1, mean)


def test_validation_samples_no_longer_weigh_the_mean():
    # Before: weights were the validation samples; now they are the selector's (training steps).
    summary = FederationSummary()
    summary.add_contribution("site-1", 0, {KEY: 1.0}, num_steps=900)
    summary.add_contribution("site-2", 0, {KEY: 0.0}, num_steps=100)
    assert dict(summary.close_round(0))[KEY] == pytest.approx(0.9)


def test_cross_site_matrix_points_and_table_rows_with_failed_evaluations():
    summary = FederationSummary()
    summary.add_cross_site("site-2", "site-1", {"val_acc": 0.5, "note": "text"})
    summary.add_cross_site("SRV_FL_global_model.pt", "site-1", {"val_acc": 0.75, "val_loss": 1})
    summary.add_cross_site("site-1", "site-2", None)
    points, rows = summary.cross_site()
    assert points == [
        ("cross_site/SRV_FL_global_model.pt/site-1/val_acc", 0.75),
        ("cross_site/SRV_FL_global_model.pt/site-1/val_loss", 1.0),
        ("cross_site/site-2/site-1/val_acc", 0.5),
    ]
    assert len(rows) == 4 and rows[2]["model"] == "site-1" and rows[2]["metric"] == "error"
    assert math.isnan(rows[2]["value"])
    assert FederationSummary().cross_site() == ([], [])


def test_too_few_rounds_fail_the_job_and_every_run():
    summary = FederationSummary(num_rounds="3")
    summary.add_contribution("site-1", 0, {KEY: 0.5})
    summary.close_round(0)
    status, failure, sites = summary.outcome(["site-1"])
    assert (status, failure, sites) == (FAILED, "ended after 1 of 3 rounds", {"site-1": FAILED})


def test_a_fatal_error_names_the_failure_and_no_best_model_is_taken_after_it():
    summary = FederationSummary(num_rounds=1)
    summary.set_best(0, 0.4)
    summary.fail("round 0: only 1 of the 2 site updates needed (min_clients) arrived")
    summary.set_best(1, 0.9)
    summary.close_round(0)
    status, failure, sites = summary.outcome(["site-1", "site-2"])
    assert status == FAILED and failure.startswith("round 0: only 1 of the 2")
    assert set(sites.values()) == {FAILED} and summary.best == (0, 0.4)


def test_no_planned_round_count_means_no_rounds_check():
    assert FederationSummary(num_rounds=None).outcome([]) == (FINISHED, None, {})
    assert FederationSummary(num_rounds="not a number").outcome([]) == (FINISHED, None, {})
