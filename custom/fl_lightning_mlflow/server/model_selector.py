"""KeyMetricSelector: FLARE's IntimeModelSelector with the key metric's direction said, not guessed.

key_metric_mode "max" (higher is better, e.g. an accuracy) or "min" (lower is better, e.g. a
loss or an MSE): "min" is IntimeModelSelector's negate_key_metric, as FLARE's Recipe API calls it
key_metric_mode. The tracker reads the mode from this component, so the champion alias, the
fairness metrics' worst site and what flctl prints follow the same one setting.
"""

from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector

MODES = ("max", "min")


class KeyMetricSelector(IntimeModelSelector):
    def __init__(self, key_metric: str = "global_val_acc", key_metric_mode: str = "max", weigh_by_local_iter=True,
                 aggregation_weights=None, best_value: float | None = None):  # fmt: skip
        if not isinstance(key_metric, str) or not key_metric:
            raise ValueError(f"KeyMetricSelector: key_metric must be a metric name, got {key_metric!r}")
        if key_metric_mode not in MODES:
            raise ValueError(f'KeyMetricSelector: key_metric_mode must be "max" or "min", got {key_metric_mode!r}')
        super().__init__(
            weigh_by_local_iter=weigh_by_local_iter,
            aggregation_weights=aggregation_weights,
            key_metric=key_metric,
            negate_key_metric=key_metric_mode == "min",
        )
        self.key_metric_mode = key_metric_mode
        if best_value is not None:
            if not isinstance(best_value, (int, float)) or isinstance(best_value, bool):
                raise ValueError(f"KeyMetricSelector: best_value must be a number or null, got {best_value!r}")
            # The selector maximises: a lower-is-better value is held negated, as it holds its own.
            self.best_val_metric = -float(best_value) if key_metric_mode == "min" else float(best_value)
            self.best_raw_val_metric = float(best_value)


def mode_of(selector) -> str:
    """ "min" or "max" for any IntimeModelSelector (the stock one says it by negate_key_metric)."""
    return "min" if getattr(selector, "negate_key_metric", False) else "max"
