"""The federation's own account of a job, in plain numbers: no FLARE, no MLflow.

Per round: the received global model's metrics as each site measured them, their weighted
mean and how many sites contributed; which round's global model was best; the cross-site
evaluation matrix; and at the end the job's status, why it failed and which sites dropped out.

The weighted mean uses exactly the weights of FLARE's IntimeModelSelector (number of local
training steps if weigh_by_local_iter, times the per-site aggregation weight, default 1), and
only contributions for the current round with finite values, as the selector does. So the
mean of the selector's key_metric in the best round is the very number that chose
best_FL_global_model.pt (the registered version's key_metric_value tag).
"""

import math

FINISHED, FAILED = "FINISHED", "FAILED"
CONTRIBUTING_SITES = "contributing_sites"
WORST_SITE, SPREAD = "worst_site", "spread"  # fairness beside the mean: name/worst_site, name/spread


def _number(value) -> bool:
    return isinstance(value, (int, float))


class FederationSummary:
    def __init__(self, num_rounds=None, weigh_by_local_iter: bool = True, aggregation_weights: dict | None = None,
                 metric_modes: dict | None = None):  # fmt: skip
        """weigh_by_local_iter, aggregation_weights: the model selector's settings of the same name.
        metric_modes: {metric name: "max" or "min"}, the direction of the metrics whose worst site
        is reported (the key metric's mode, from the model selector, and any the tracker names);
        nothing is guessed from a name: a metric without a mode gets no worst_site."""
        self.num_rounds = num_rounds
        self.weigh_by_local_iter = weigh_by_local_iter
        self.metric_modes = dict(metric_modes or {})
        self.aggregation_weights = dict(aggregation_weights or {})
        self.rounds_done = 0
        self.failure: str | None = None
        self.best: tuple | None = None  # (round, the selector's value)
        self._rounds: dict = {}  # round -> site -> (metrics, weight or None)
        self._last_round_of: dict = {}  # site -> the last round it sent an update for
        self._cross_site: dict = {}  # (model owner, data site) -> {metric: value} or None (failed)
        # What cross-site evaluation covered (server.cross_site_eval: all, global, none); None: not said
        # (FLARE's own CrossSiteModelEval), and the table has no such column.
        self.cross_site_models: str | None = None

    # ----- training rounds ------------------------------------------------------------------
    def weight(self, site: str, num_steps) -> float | None:
        """The selector's weight for this site's update (num_steps: the update's
        NUM_STEPS_CURRENT_ROUND, 1.0 when absent), or None when it is not a number."""
        n_iter = num_steps if self.weigh_by_local_iter else 1.0
        factor = self.aggregation_weights.get(site, 1.0)
        if not (_number(n_iter) and _number(factor)):
            return None
        return n_iter * factor  # the selector's expression, so the float result is the same

    def add_contribution(self, site: str, fl_round, metrics, num_steps=1.0, current_round=None) -> bool:
        """One site's update arrived; metrics: the global model's, measured by the site.

        An update for another round than the current one is discarded by the aggregator
        and the selector alike, so it counts for nothing here either (False)."""
        if fl_round is None:
            return False
        self._last_round_of[site] = max(fl_round, self._last_round_of.get(site, fl_round))
        if current_round is not None and fl_round != current_round:
            return False
        if isinstance(metrics, dict):
            self._rounds.setdefault(fl_round, {})[site] = (metrics, self.weight(site, num_steps))
        return True

    def close_round(self, fl_round) -> list:
        """The round's points [(name, value)]: per metric the weighted mean, then each site's
        value as name/site, then fairness: name/worst_site (the lowest value, the highest for
        a metric whose mode is "min"; only for metrics with a mode) and name/spread (highest minus
        lowest, over finite values); last, how many sites contributed."""
        if fl_round is None:
            return []
        self.rounds_done += 1
        contributions = self._rounds.pop(fl_round, {})
        points = []
        for key in sorted({k for metrics, _ in contributions.values() for k in metrics}):
            mean = self._weighted_mean(key, contributions)
            if mean is not None:
                points.append((key, mean))
            values = []
            for site, (metrics, _) in sorted(contributions.items()):
                if _number(metrics.get(key)):
                    points.append((f"{key}/{site}", float(metrics[key])))
                    if math.isfinite(metrics[key]):
                        values.append(float(metrics[key]))
            if values:
                mode = self.metric_modes.get(key)
                if mode in ("max", "min"):
                    points.append((f"{key}/{WORST_SITE}", max(values) if mode == "min" else min(values)))
                points.append((f"{key}/{SPREAD}", max(values) - min(values)))
        points.append((CONTRIBUTING_SITES, float(len(contributions))))
        return points

    @staticmethod
    def _weighted_mean(key: str, contributions: dict) -> float | None:
        # Summed in arrival order, starting from 0, as the selector sums: the same float.
        weighted_sum = sum_of_weights = 0
        for metrics, weight in contributions.values():
            value = metrics.get(key)
            if weight is None or not _number(value) or not math.isfinite(value):
                continue
            weighted_sum += float(value) * weight
            sum_of_weights += weight
        return weighted_sum / sum_of_weights if sum_of_weights else None

    def set_best(self, fl_round, value) -> None:
        if self.failure is None:  # a failing job's last model is not a "best" worth recording
            self.best = (fl_round, value)

    # ----- cross-site evaluation --------------------------------------------------------------
    def add_cross_site(self, owner, site, metrics: dict | None) -> None:
        """metrics None: the evaluation of owner's model on site's data failed."""
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items() if _number(v)}
        self._cross_site[(owner, site)] = metrics

    def cross_site(self) -> tuple:
        """(points [(name, value)], table rows), ordered by model then data site; each row says what
        the evaluation covered ("evaluated") when the workflow said it."""
        points, rows = [], []
        evaluated = {"evaluated": self.cross_site_models} if self.cross_site_models else {}
        for (owner, site), metrics in sorted(self._cross_site.items(), key=lambda kv: tuple(map(str, kv[0]))):
            for key, value in (metrics or {}).items():
                points.append((f"cross_site/{owner}/{site}/{key}", value))
                rows.append({"model": owner, "data_site": site, "metric": key, "value": value, **evaluated})
            if metrics is None:
                rows.append({"model": owner, "data_site": site, "metric": "error", "value": float("nan"), **evaluated})
        return points, rows

    # ----- the end -----------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        self.failure = str(reason)

    def outcome(self, sites) -> tuple:
        """(job status, failure reason or None, {site: status}): a site that sent no update in
        the last completed round dropped out and its run fails."""
        if self.failure is None and self.num_rounds:
            try:
                planned = int(self.num_rounds)
            except (TypeError, ValueError):
                planned = 0
            if self.rounds_done < planned:
                self.failure = f"ended after {self.rounds_done} of {self.num_rounds} rounds"
        status = FAILED if self.failure else FINISHED
        last_round = self.rounds_done - 1
        site_status = {
            site: FAILED if (self.failure or self._last_round_of.get(site, -1) < last_round) else FINISHED
            for site in sites
        }
        return status, self.failure, site_status
