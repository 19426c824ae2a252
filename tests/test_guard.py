"""MinClientsGuard driven with real FLARE contexts and events: it ends the job through
system_panic (FATAL_SYSTEM_ERROR with the reason) when a round closes with too few updates."""

import pytest
from nvflare.apis.client import Client
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContextManager
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from fl_lightning_mlflow.server.guard import MinClientsGuard


class Engine:
    """What the guard asks of FLARE's server engine, no more: the job's clients, and firing an
    event (recorded with the reason system_panic puts in the context)."""

    def __init__(self, sites):
        self.sites, self.fired = sites, []

    def get_clients(self):
        return [Client(site, None) for site in self.sites]

    def fire_event(self, event_type, fl_ctx):
        self.fired.append((event_type, fl_ctx.get_prop(FLContextKey.EVENT_DATA)))


def run_round(guard, engine, fl_round, accepted=(), refused=(), disconnected=()):
    contexts = FLContextManager(engine=engine, identity_name="server", job_id="job-1")
    fl_ctx = contexts.new_context()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, fl_round, private=True, sticky=False)
    guard.handle_event(AppEventType.ROUND_STARTED, fl_ctx)
    for site in disconnected:
        fl_ctx.set_prop(FLContextKey.DISCONNECTED_CLIENT_NAME, site, private=True, sticky=False)
        guard.handle_event(EventType.CLIENT_DISCONNECTED, fl_ctx)
    for site, ok in [(s, True) for s in accepted] + [(s, False) for s in refused]:
        fl_ctx.set_peer_context(FLContextManager(identity_name=site).new_context())
        fl_ctx.set_prop(AppConstants.AGGREGATION_ACCEPTED, ok, private=True, sticky=False)
        guard.handle_event(AppEventType.AFTER_CONTRIBUTION_ACCEPT, fl_ctx)
    guard.handle_event(AppEventType.BEFORE_AGGREGATION, fl_ctx)
    return fl_ctx


@pytest.mark.parametrize("bad", [0, -1, True, "2", 1.5])
def test_min_clients_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=f"min_clients must be an integer >= 1, got {bad!r}"):
        MinClientsGuard(min_clients=bad)


def test_enough_accepted_updates_let_the_round_aggregate():
    engine = Engine(["site-1", "site-2", "site-3"])
    guard = MinClientsGuard(min_clients=2)
    run_round(guard, engine, 0, accepted=["site-1", "site-2"], refused=["site-3"])
    assert engine.fired == []


def test_too_few_updates_end_the_job_with_a_reason_naming_the_missing_sites():
    engine = Engine(["site-1", "site-2", "site-3"])
    guard = MinClientsGuard(min_clients=2, train_timeout=30)
    run_round(guard, engine, 0, accepted=["site-1", "site-2", "site-3"])
    fl_ctx = run_round(guard, engine, 1, accepted=["site-1"], refused=["site-3"], disconnected=["site-2"])
    reason = (
        "round 1: only 1 of the 2 site updates needed (min_clients) arrived within train_timeout=30 s; "
        "none from site-2 (disconnected), site-3. FedAvg cannot go on with too few sites: ending the job"
    )
    assert engine.fired == [(EventType.FATAL_SYSTEM_ERROR, reason)]
    assert fl_ctx.get_prop(FLContextKey.EVENT_DATA) == reason  # what FederatedMLflowTracker reads


def test_updates_of_an_earlier_round_do_not_count_for_the_next():
    engine = Engine(["site-1", "site-2"])
    guard = MinClientsGuard(min_clients=2)
    run_round(guard, engine, 0, accepted=["site-1", "site-2"])
    run_round(guard, engine, 1, accepted=["site-2"])
    ((event, reason),) = engine.fired
    assert event == EventType.FATAL_SYSTEM_ERROR
    assert reason.startswith("round 1: only 1 of the 2 site updates needed (min_clients) arrived; none from site-1.")
