"""The site's own streaming budget as a rule of its outbound gate (site.outbound).

Points over the budget (common.stream_budget: a rate with a burst allowance) are held back on
the site, before anything leaves it, and counted in the gate's "throttled" column: the counts
ride in the task results beside the sent counts, and the server's delivery table shows them.
Within one step's record the first points go out; the rest of a burst waits for nothing: it is
dropped, so a flooding site cannot make its own later records (or any other site's) late.
The rule sits after the disclosure policy: what the policy withholds does not use the budget.
"""

from fl_lightning_mlflow.common.stream_budget import StreamBudget
from fl_lightning_mlflow.site.outbound import Rule


class BudgetRule(Rule):
    column = "throttled"
    streams_only = True  # the metrics in task results are few, and the server's model selection needs them

    def __init__(self, budget: StreamBudget):
        self.budget = budget

    def metrics(self, values: dict) -> dict:
        allowed = self.budget.take(len(values))
        if allowed >= len(values):
            return values
        return dict(list(values.items())[:allowed])
