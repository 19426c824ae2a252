"""Server-side guard: end the job when a round closes with fewer updates than min_clients.

ScatterAndGather waits for min_clients results, but when a site dies and the train task
times out (train_timeout, or FLARE's dead-client detection in POC and production), it
aggregates whatever arrived, so a 2-site FedAvg would quietly carry on as 1-site training.
This widget counts the updates the aggregator accepted in the round and, before aggregation,
ends the job with a reason naming the missing sites if there are too few. The reason reaches
FederatedMLflowTracker, which marks the runs FAILED with it.
"""

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget


class MinClientsGuard(Widget):
    def __init__(self, min_clients: int, train_timeout: int = 0):
        """min_clients and train_timeout: the same values as the ScatterAndGather workflow's."""
        super().__init__()
        if not isinstance(min_clients, int) or isinstance(min_clients, bool) or min_clients < 1:
            raise ValueError(f"MinClientsGuard: min_clients must be an integer >= 1, got {min_clients!r}")
        self.min_clients = min_clients
        self.train_timeout = train_timeout
        self.accepted: set = set()
        self.disconnected: set = set()
        self.round = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == AppEventType.ROUND_STARTED:
            self.round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            self.accepted = set()
        elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            if fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED):
                peer = fl_ctx.get_peer_context()
                self.accepted.add(peer.get_identity_name() if peer else "?")
        elif event_type == EventType.CLIENT_DISCONNECTED:
            self.disconnected.add(fl_ctx.get_prop(FLContextKey.DISCONNECTED_CLIENT_NAME))
        elif event_type == AppEventType.BEFORE_AGGREGATION and len(self.accepted) < self.min_clients:
            sites = sorted(c.name for c in fl_ctx.get_engine().get_clients())
            missing = [s for s in sites if s not in self.accepted]
            why = [f"{s} (disconnected)" if s in self.disconnected else s for s in missing]
            waited = f" within train_timeout={self.train_timeout} s" if self.train_timeout else ""
            self.system_panic(
                f"round {self.round}: only {len(self.accepted)} of the {self.min_clients} site updates needed "
                f"(min_clients) arrived{waited}; none from {', '.join(why) or '?'}. FedAvg cannot go on "
                "with too few sites: ending the job",
                fl_ctx,
            )
