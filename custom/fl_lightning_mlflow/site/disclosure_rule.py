"""The site's disclosure policy (site.disclosure_policy) as a rule of the outbound gate
(site.outbound): what it holds back is counted in the delivery table's "withheld" column.

Metrics: a name leaves if the policy's metric patterns allow it; a validation metric (by the
policy's validation_metrics patterns) only when the site's validation set has at least
min_validation_samples samples; then noise (Laplace or Gaussian, the site's scale) and, after it,
coarsening (rounded to a multiple of the site's step) change the value that leaves; the raw value
never does. System metrics (system/...) leave only if system_metrics is true. Params and tags by
their patterns; dataset descriptions in full (histogram bins below min_label_count suppressed), as
counts (no label histogram) or not at all; text artifacts only if text_artifacts is true.
"""

import numpy as np

from fl_lightning_mlflow.common.protocol import SYSTEM_PREFIX, WITHHELD
from fl_lightning_mlflow.site.disclosure_policy import Policy, matches
from fl_lightning_mlflow.site.outbound import Rule


class DisclosureRule(Rule):
    column = WITHHELD

    def __init__(self, policy: Policy, val_samples: int | None = None, rng=None):
        """val_samples: the site's validation samples (the executor sets it once the engine is set
        up); unknown while None, when a min_validation_samples > 0 holds validation metrics back."""
        self.policy = policy
        self.val_samples = val_samples
        # Noise from the operating system's entropy, never the training seed: a seeded run would
        # otherwise draw the same noise the reader could subtract.
        self.rng = rng or np.random.default_rng()

    def metrics(self, values: dict) -> dict:
        out = {}
        for name, value in values.items():
            if name.startswith(SYSTEM_PREFIX):
                if self.policy.system_metrics:
                    out[name] = value
            elif self.policy.metrics.allows(name) and self._enough_samples(name):
                out[name] = self._transformed(name, value)
        return out

    def _enough_samples(self, name: str) -> bool:
        need = self.policy.min_validation_samples
        if not need or not matches(name, self.policy.validation_metrics):
            return True
        return self.val_samples is not None and self.val_samples >= need

    def _transformed(self, name: str, value):
        for pattern, (mechanism, scale) in self.policy.noise.items():
            if matches(name, (pattern,)):
                draw = self.rng.laplace if mechanism == "laplace" else self.rng.normal
                value = float(value) + float(draw(0.0, scale))
                break
        for pattern, step in self.policy.coarsen.items():
            if matches(name, (pattern,)):
                value = float(round(float(value) / step) * step)
                break
        return value

    def texts(self, item: str, values: dict) -> dict:
        names = self.policy.params if item == "param" else self.policy.tags
        return {k: v for k, v in values.items() if names.allows(k)}

    def dataset(self, context: str, info: dict) -> dict | None:
        disclose = self.policy.disclose
        if disclose == "none":
            return None
        histogram = info.get("label_histogram")
        if disclose == "counts" and histogram:
            info["label_histogram"] = {}
        elif histogram and self.policy.min_label_count:
            # small groups suppressed: a bin of a few patients can identify them
            info["label_histogram"] = {k: n for k, n in histogram.items() if n >= self.policy.min_label_count}
        return info

    def text(self, artifact_path: str) -> bool:
        return self.policy.text_artifacts
