"""QUEUE_POLICY=fair (design.md, "Fair share"): the line interleaves users by their weights,
each user's rows in order; batches stay full, one credit per address; switching the policy or
a weight reorders what is still in line within one creation cycle. The FIFO invariant under
`fifo` is tests/test_invariants.py's and tests/test_creation_cycle.py's, unchanged; the fault
run, kill -9 and lock-loss tests run under `fair` there too."""
import datetime

import pytest
from conftest import addresses, rode_on, statuses, submit, with_settings
from peewee import IntegrityError

from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.queue import fairness, pauses
from bouncer.queue.waiting import waiting_of
from bouncer.reading.batches import batch_status, page_of_batches
from bouncer.states import SENT, RowState
from bouncer.store.database import database, utcnow
from bouncer.store.models import BouncerBatch, LineOrder, QueuedEmail, SentShare, UserBatch, UserBatchEmail
from support import invariants


def fair(app, **settings):
    return with_settings(app, queue_policy="fair", **settings)


def users_per_bouncer_batch():
    """[{user: rows}] of every Bouncer batch Bouncer accepted, in ledger order."""
    ledger_of, found = rode_on(), {}
    for row_id, user in UserBatchEmail.select(UserBatchEmail.id, UserBatch.user_id).join(UserBatch).tuples():
        if row_id in ledger_of:
            found.setdefault(ledger_of[row_id], {}).setdefault(user, 0)
            found[ledger_of[row_id]][user] += 1
    return [found[k] for k in sorted(found)]


def host_sets_weight(user_id, weight):
    """What a host application does: plain SQL, an upsert."""
    database.execute_sql("INSERT INTO user_weights (user_id, weight) VALUES (%s, %s) ON CONFLICT (user_id)"
                         " DO UPDATE SET weight = excluded.weight" % (database.param, database.param),
                         (user_id, weight))


def drain(app, bouncer, cycles=40):
    for _ in range(cycles):
        run_cycle(app, CREATION, "deliverable")
        bouncer.complete_now()
        run_cycle(app, STATUS, "deliverable")
        if not UserBatchEmail.select().where(UserBatchEmail.status == RowState.QUEUED).exists():
            return
    raise AssertionError("did not drain")


def sends_per_address(bouncer):
    counts = {}
    for address in bouncer.sent_addresses():
        counts[address] = counts.get(address, 0) + 1
    return counts


def test_fair_shares_each_batch_between_users_by_their_weights(app, bouncer):
    app = fair(app, batch_size=10, max_outstanding=3)
    host_sets_weight("carol", 3)
    for user in ("alice", "bob", "carol"):
        submit(user, addresses(user, 60))
    report = run_cycle(app, CREATION, "deliverable")
    assert [n for _, _, n in report.created] == [10, 10, 10]
    # Weights 1, 1, 3: of every 10 addresses alice and bob have 2 each, carol 6.
    assert users_per_bouncer_batch() == [{"alice": 2, "bob": 2, "carol": 6}] * 3
    assert sorted(SentShare.select(SentShare.user_id, SentShare.addresses).tuples()) == sorted(
        [("alice", 2), ("bob", 2), ("carol", 6)] * 3)


def test_fair_shares_stay_within_one_batch_of_the_weights_over_a_run(app, bouncer):
    app = fair(app, batch_size=7, max_outstanding=3)
    host_sets_weight("bob", 2.5)
    submit("alice", addresses("a", 90))
    submit("bob", addresses("b", 200))
    submit("carol", addresses("c", 15))      # runs out early: the others share her slots
    sent = {"alice": 0, "bob": 0, "carol": 0}
    for _ in range(4):
        run_cycle(app, CREATION, "deliverable")
        bouncer.complete_now()
        run_cycle(app, STATUS, "deliverable")
    for batch in users_per_bouncer_batch():
        assert sum(batch.values()) == 7                             # every batch full
        for user, rows in batch.items():
            sent[user] += rows
    total = sum(sent.values())
    assert sent["carol"] == 15
    # What alice and bob got beside each other is 1 : 2.5, within one batch.
    assert abs(sent["bob"] - 2.5 * sent["alice"]) <= 7, sent
    assert total == 12 * 7


@pytest.mark.parametrize("policy", ["fair", "fifo"])
def test_a_late_small_batch_is_in_the_next_bouncer_batch_created_after_its_admission(app, bouncer, policy):
    app = with_settings(app, queue_policy=policy, batch_size=10, max_outstanding=3)
    submit("big", addresses("big", 500))
    run_cycle(app, CREATION, "deliverable")                     # every slot taken by big's rows
    small = submit("small", addresses("small", 5))
    bouncer.complete_now(next(iter(bouncer.batches)))
    run_cycle(app, STATUS, "deliverable")
    report = run_cycle(app, CREATION, "deliverable")
    assert [n for _, _, n in report.created] == [10]
    if policy == "fair":
        assert statuses(small) == {SENT: 5}
        assert users_per_bouncer_batch()[-1] == {"big": 5, "small": 5}
    else:
        assert statuses(small) == {RowState.QUEUED: 5}          # behind the other 460 of big's


def test_fair_batches_stay_full_and_cost_one_credit_per_address(app, bouncer):
    app = fair(app, batch_size=10, max_outstanding=3)
    submit("alice", addresses("p", 40) + ["First.Last@gmail.com"])
    submit("bob", [a.upper() for a in addresses("p", 20)] + addresses("b", 25) + ["firstlast+x@googlemail.com"])
    submit("carol", addresses("p", 5) + addresses("p", 5) + addresses("c", 3))
    drain(app, bouncer)
    sizes = [len(b["distinct"]) for b in bouncer.batches.values()]
    assert all(n == 10 for n in sizes[:-1]) and 0 < sizes[-1] <= 10, sizes
    # Bouncer's count: one credit per distinct stripped address, whoever sent it.
    assert sum(sizes) == 40 + 1 + 25 + 3
    assert all(n == 1 for n in sends_per_address(bouncer).values())
    assert invariants.every_email_finished() == []


def test_a_user_coming_back_gets_no_credit_for_the_time_they_had_nothing_queued(app, bouncer):
    app = fair(app, batch_size=10, max_outstanding=3)
    submit("bob", addresses("b", 300))
    for _ in range(2):                                          # bob alone: 60 addresses sent
        run_cycle(app, CREATION, "deliverable")
        bouncer.complete_now()
        run_cycle(app, STATUS, "deliverable")
    submit("alice", addresses("a", 100))
    run_cycle(app, CREATION, "deliverable")
    # Alice shares from now on; she does not make up for the 60 bob had alone.
    assert users_per_bouncer_batch()[-3:] == [{"alice": 5, "bob": 5}] * 3


def test_each_users_rows_keep_their_order_even_a_row_written_late_into_an_earlier_batch(app, bouncer):
    app = fair(app, batch_size=4, max_outstanding=1)
    first = submit("alice", addresses("a", 6))
    submit("alice", addresses("second", 6))
    submit("bob", addresses("b", 20))
    before = 0
    for cycle in range(8):
        if cycle == 1:      # a host writes one more row into alice's first batch, admitted late
            database.execute_sql("INSERT INTO user_batch_emails (batch_id, position, email) VALUES (%s, 7, %s)"
                                 % (database.param, database.param), (first, "late@example.com"))
        run_cycle(app, CREATION, "deliverable")
        assert invariants.sent_out_of_user_order(before, "deliverable") == []
        before = BouncerBatch.select(BouncerBatch.id).order_by(BouncerBatch.id.desc()).scalar()
        bouncer.complete_now()
        run_cycle(app, STATUS, "deliverable")
    sent = bouncer.sent_addresses()
    alice = [a for a in sent if not a.startswith("b")]
    assert alice == addresses("a", 6) + ["late@example.com"] + addresses("second", 6)


def test_a_failed_calls_rows_lead_the_next_cycle_in_each_users_order(app, bouncer):
    app = fair(app, batch_size=10, max_outstanding=3)
    submit("alice", addresses("a", 50))
    submit("bob", addresses("b", 50))
    bouncer.fail_next(500, kind="create")
    report = run_cycle(app, CREATION, "deliverable")
    assert len(report.failed_calls) == 1 and len(report.created) == 2
    assert sorted(bouncer.sent_addresses()) == sorted(addresses("a", 15)[5:] + addresses("b", 15)[5:])
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    before = BouncerBatch.select(BouncerBatch.id).order_by(BouncerBatch.id.desc()).scalar()
    run_cycle(app, CREATION, "deliverable")
    assert invariants.sent_out_of_user_order(before, "deliverable") == []
    assert sorted(bouncer.sent_addresses()[20:30]) == sorted(addresses("a", 5) + addresses("b", 5))


def line_in_order():
    """[(user, position)] of the rows in line, in the order packing walks them."""
    return [(q.user_id, q.position) for q in QueuedEmail.select().order_by(
        QueuedEmail.check_type, QueuedEmail.turn, QueuedEmail.fifo_order, QueuedEmail.position)]


def test_switching_the_policy_reorders_what_is_in_line_within_one_cycle_losing_and_doubling_nothing(app, bouncer):
    app = with_settings(app, batch_size=10, max_outstanding=1)
    submit("big", addresses("big", 100))
    submit("small", addresses("small", 6))
    assert line_in_order()[:3] == [("big", 1), ("big", 2), ("big", 3)]
    report = run_cycle(fair(app), CREATION, "deliverable")
    assert report.reordered == 106
    assert LineOrder.get(LineOrder.check_type == "deliverable").policy == "fair"
    assert users_per_bouncer_batch() == [{"big": 5, "small": 5}]
    assert line_in_order()[:3] == [("big", 6), ("small", 6), ("big", 7)]
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    report = run_cycle(app, CREATION, "deliverable")      # back to fifo: the original plan's line
    assert report.reordered == 96
    assert users_per_bouncer_batch()[-1] == {"big": 10}
    assert line_in_order()[-1] == ("small", 6)
    assert run_cycle(app, CREATION, "deliverable").reordered is None     # once is enough
    drain(app, bouncer)
    assert invariants.every_email_finished() == []
    assert sorted(sends_per_address(bouncer)) == sorted(addresses("big", 100) + addresses("small", 6))
    assert set(sends_per_address(bouncer).values()) == {1}


def test_a_weight_a_host_changes_takes_effect_for_the_rows_in_line_within_one_cycle(app, bouncer):
    app = fair(app, batch_size=10, max_outstanding=2)
    submit("alice", addresses("a", 100))
    submit("bob", addresses("b", 100))
    run_cycle(app, CREATION, "deliverable")
    assert users_per_bouncer_batch() == [{"alice": 5, "bob": 5}] * 2
    host_sets_weight("bob", 4)
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    report = run_cycle(app, CREATION, "deliverable")
    assert report.reordered == 90                           # only bob's rows took new turns
    assert users_per_bouncer_batch()[-2:] == [{"alice": 2, "bob": 8}] * 2
    database.execute_sql("DELETE FROM user_weights")          # back to 1 each
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    run_cycle(app, CREATION, "deliverable")
    assert users_per_bouncer_batch()[-2:] == [{"alice": 5, "bob": 5}] * 2


@pytest.mark.parametrize("weight", [0, -1, None])
def test_the_database_refuses_a_weight_not_above_zero(db, weight):
    with pytest.raises(IntegrityError), database.atomic():
        database.execute_sql("INSERT INTO user_weights (user_id, weight) VALUES ('alice', %s)" % database.param,
                             (weight,))
    host_sets_weight("alice", 0.5)
    with pytest.raises(IntegrityError), database.atomic():
        database.execute_sql("UPDATE user_weights SET weight = %s" % database.param, (weight,))
    assert fairness.weight_of("alice") == 0.5 and fairness.weight_of("bob") == 1.0


def test_the_status_object_says_the_weight_the_place_in_line_and_an_estimated_start(app, bouncer):
    app = with_settings(app, batch_size=10, max_outstanding=1)
    host_sets_weight("bob", 2)
    alice, bob = submit("alice", addresses("a", 30)), submit("bob", addresses("b", 5))
    now = utcnow()
    # Alice's next row leads the line: it goes out now. Bob's has alice's 30 ahead of it, and no
    # pace is known yet to say when.
    assert waiting_of(list(UserBatch.select().order_by(UserBatch.id)), now) == {
        alice: {"weight": 1.0, "place_in_line": 0, "estimated_start_at": now.isoformat() + "Z"},
        bob: {"weight": 2.0, "place_in_line": 30, "estimated_start_at": None}}
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    # The pace of the last hour: 10 addresses sent 100 s ago and done since, 0.1 a second.
    now = utcnow()
    BouncerBatch.update(sent_at=now - datetime.timedelta(seconds=100), finished_at=now).execute()
    in_200_s = (now + datetime.timedelta(seconds=200)).isoformat() + "Z"
    assert waiting_of([UserBatch.get_by_id(bob)], now)[bob] == {
        "weight": 2.0, "place_in_line": 20, "estimated_start_at": in_200_s}
    assert {k: batch_status(bob)[k] for k in ("weight", "place_in_line")} == {"weight": 2.0, "place_in_line": 20}
    # Under fair the line is numbered anew (creation paused, so nothing is sent): bob's first
    # row shares turn 0 with alice's first, which came first.
    pauses.pause("deliverable", "a look at the line", "test")
    run_cycle(fair(app), CREATION, "deliverable")
    assert batch_status(bob)["place_in_line"] == 1
    assert {b["batch_id"]: b["place_in_line"] for b in page_of_batches(10)[0]} == {alice: 0, bob: 1}
    pauses.resume("deliverable", "test")
    drain(fair(app), bouncer)
    assert {k: batch_status(bob)[k] for k in ("status", "place_in_line", "estimated_start_at")} == {
        "status": "completed", "place_in_line": None, "estimated_start_at": None}


def test_a_page_of_batches_is_placed_in_line_in_one_pass_each_behind_all_before_it(app, bouncer):
    from bouncer.queue.waiting import places_in_line
    ids = [submit(user, addresses(user, n)) for user, n in (("a", 10), ("b", 20), ("c", 5))]
    catchall = submit("d", addresses("d", 3), check_type="catchall")
    batches = list(UserBatch.select().order_by(UserBatch.id.desc()))
    assert places_in_line(batches) == {ids[0]: 0, ids[1]: 10, ids[2]: 30, catchall: 0}
    run_cycle(fair(app, batch_size=9, max_outstanding=1), CREATION, "deliverable")
    # Fair: a, b and c each had 3 of the first 9; their next rows are at turn 3, in their order.
    assert places_in_line(list(UserBatch.select())) == {ids[0]: 0, ids[1]: 1, ids[2]: 2, catchall: 0}


@pytest.mark.parametrize("written,counted", [(1e9, 1000.0), (1e-9, 0.001), (float("inf"), 1000.0),
                                             (float("nan"), 1000.0)])
def test_a_weight_a_host_writes_out_of_bounds_counts_as_the_nearest_bound(app, bouncer, written, counted):
    from conftest import on_postgres
    if written != written and not on_postgres():
        with pytest.raises(IntegrityError), database.atomic():   # SQLite stores NaN as NULL
            host_sets_weight("bob", written)
        return
    host_sets_weight("bob", written)       # PostgreSQL takes 'NaN' as above 0
    assert fairness.weight_of("bob") == counted
    submit("alice", addresses("a", 30))
    submit("bob", addresses("b", 30))
    run_cycle(fair(app, batch_size=10, max_outstanding=1), CREATION, "deliverable")
    # Alice's first row and bob's share turn 0; then bob's fill the batch, or alice's do.
    bob = {1000.0: 9, 0.001: 1}[counted]
    assert users_per_bouncer_batch()[0].get("bob") == bob
    assert batch_status(UserBatch.get(UserBatch.user_id == "bob").id)["weight"] == counted
