"""Invariant 12: the database is the last word on the limits. Even with two creation cycles
running at once (a cycle lock lost when Redis restarted under it), no check type ever has more
than BOUNCER_MAX_OUTSTANDING batches in flight, and no address is in two of them."""
import pytest
from conftest import addresses, submit, with_settings

from bouncer.cycles.creation import create_batches
from bouncer.cycles.runner import Cycle
from bouncer.names import CREATION
from bouncer.store.database import database
from bouncer.store.models import BouncerBatch
from support import invariants
from support.waiting import at_once


@pytest.mark.parametrize("policy", ["fifo", "fair"])
def test_two_creation_cycles_at_once_never_break_the_cap(sandbox_app, sandbox, policy):
    # Under fair, both cycles also find the line to be ordered anew: one does it, the other
    # finds it done.
    app = with_settings(sandbox_app, max_outstanding=3, batch_size=10, queue_policy=policy)
    submit("alice", addresses("a", 100))
    submit("bob", addresses("a", 50) + addresses("b", 50))     # repeats of alice's addresses
    sandbox.slow_rate, sandbox.slow_seconds = 1.0, 0.3          # the two overlap at Bouncer
    database.close()

    def one_cycle():
        cycle = Cycle(app, CREATION, "deliverable")              # no lock: as if it had been lost
        try:
            create_batches(cycle)
        finally:
            database.close()
        return cycle.report

    reports, errors = at_once(one_cycle, 2)
    database.connect(reuse_if_open=True)
    assert errors == []
    assert sum(len(r.created) for r in reports) == 3            # both tried; three slots in all
    assert invariants.max_in_flight_from_ledger("deliverable") == 3
    assert invariants.at_most_max_outstanding(3) == []
    assert invariants.no_address_in_two_in_flight_batches() == []
    assert BouncerBatch.select().count() == 3
    assert [r.reordered for r in reports if r.reordered is not None] == ([200] if policy == "fair" else [])
