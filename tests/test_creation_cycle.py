"""The creation cycle: greedy FIFO packing, limits, dedupe, cache, and what failures leave."""
import datetime
import logging
import time

import pytest
import requests
from conftest import addresses, in_another_thread, rode_on, row_states, statuses, submit, with_settings
from operating import host_batch

from bouncer.cycles.runner import run_cycle
from bouncer.doors import admission
from bouncer.errors import Conflict
from bouncer.names import CREATION, STATUS
from bouncer.queue import fairness, progress
from bouncer.queue.ledger import count_possible_orphans, reserve_next_batch
from bouncer.reading.health import service_state
from bouncer.services.batches import cancel_user_batch
from bouncer.states import SENT, BouncerBatchState, RowState
from bouncer.store.database import database, utcnow
from bouncer.store.models import (
    BouncerBatch, BouncerBatchEmail, DeliverableResult, EmailGlobal, QueuedEmail, RidingRows, SentShare,
    UserBatch, UserBatchEmail,
)
from support import invariants


def users_per_bouncer_batch():
    """{ledger id: {user: rows}} of every Bouncer batch, in ledger order."""
    ledger_of = rode_on()
    query = UserBatchEmail.select(UserBatchEmail.id, UserBatch.user_id).join(UserBatch).tuples()
    result = {}
    for row_id, user in query:
        if row_id in ledger_of:
            result.setdefault(ledger_of[row_id], {}).setdefault(user, 0)
            result[ledger_of[row_id]][user] += 1
    return dict(sorted(result.items()))


def test_create_seed_example_packs_fifo_and_splits_user_batches(app, bouncer):
    # design.md's example: capacity 3, 10k per batch, 50k pending.
    app = with_settings(app, batch_size=10000, max_outstanding=3)
    for user, n in [("john", 5000), ("alice", 2000), ("bob", 6000), ("carol", 7000),
                    ("dave", 10000), ("erin", 20000)]:
        submit(user, addresses(user, n))
    report = run_cycle(app, CREATION, "deliverable")
    assert [n for _, _, n in report.created] == [10000, 10000, 10000]
    assert list(users_per_bouncer_batch().values()) == [
        {"john": 5000, "alice": 2000, "bob": 3000},
        {"bob": 3000, "carol": 7000},
        {"dave": 10000},
    ]
    assert statuses() == {RowState.QUEUED: 20000, SENT: 30000}
    # Bob's first 3,000 lines went first, in line order.
    bob = UserBatch.get(UserBatch.user_id == "bob")
    first_batch, ledger_of = min(users_per_bouncer_batch()), rode_on()
    bob_positions = [p for (r, p) in UserBatchEmail.select(UserBatchEmail.id, UserBatchEmail.position).where(
        UserBatchEmail.batch == bob.id).tuples() if ledger_of.get(r) == first_batch]
    assert sorted(bob_positions) == list(range(1, 3001))


def test_a_claim_takes_rows_out_of_the_line_without_rewriting_them(app, bouncer):
    # The rows a claim sends stay as admission left them: only the narrow line and the riding
    # rows change, so sending 10,000 rows never rewrites 10,000 wide rows and their indexes.
    batch = submit("alice", addresses("a", 5) + ["a0@example.com"])
    before = list(UserBatchEmail.select().order_by(UserBatchEmail.id).tuples())
    run_cycle(app, CREATION, "deliverable")
    assert list(UserBatchEmail.select().order_by(UserBatchEmail.id).tuples()) == before
    assert statuses(batch) == {SENT: 6}
    assert QueuedEmail.select().count() == 0 and RidingRows.select().count() == 1   # one row for the six
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert statuses(batch) == {"done": 6} and RidingRows.select().count() == 0
    assert set(rode_on().values()) == {BouncerBatch.get().id}


def test_create_sends_each_stripped_address_once_with_oldest_spelling(app, bouncer):
    submit("alice", ["John.Doe+news@gmail.com", "x@example.com"])
    submit("bob", ["johndoe@googlemail.com", "X@Example.com", "y@example.com"])
    run_cycle(app, CREATION, "deliverable")
    assert sorted(bouncer.sent_addresses()) == ["John.Doe+news@gmail.com", "x@example.com", "y@example.com"]
    assert statuses() == {SENT: 5}


def test_one_mailbox_in_both_spellings_of_its_international_domain_is_one_credit(app, bouncer):
    first = submit("alice", ["idn@bücher.example", "idn@xn--bcher-kva.example"])
    second = submit("bob", ["IDN@XN--BCHER-KVA.EXAMPLE"])
    assert UserBatch.get_by_id(first).duplicates == 1
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.sent_addresses() == ["idn@bücher.example"]        # the oldest spelling, once
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert statuses(first) == {"done": 2} and statuses(second) == {"done": 1}
    assert EmailGlobal.select().count() == 1


def test_without_a_key_nothing_is_sent_to_bouncers_own_api_and_status_says_how_to_run_locally(app, bouncer):
    keyless = with_settings(app, api_key=None, api_url="https://api.usebouncer.com")
    submit("alice", addresses("a", 3))
    report = run_cycle(keyless, CREATION, "deliverable")
    assert (report.stopped, report.created, report.failed_calls) == ("not sending: BOUNCER_API_KEY is not set", [], [])
    assert BouncerBatch.select().count() == 0 and statuses() == {RowState.QUEUED: 3}
    reason = service_state(keyless.settings)["reasons"][-1]
    assert reason.startswith("BOUNCER_API_KEY is not set: nothing is sent to Bouncer.")
    assert "python -m bouncer sandbox --port 8025" in reason and "BOUNCER_API_URL=http://127.0.0.1:8025" in reason
    # A sandbox needs no key of ours: its URL is another.
    assert not with_settings(app, api_key=None, api_url="http://127.0.0.1:8025").settings.keyless_for_bouncer


def test_create_respects_max_outstanding_across_cycles(app, bouncer):
    submit("alice", addresses("a", 100))
    first = run_cycle(app, CREATION, "deliverable")
    second = run_cycle(app, CREATION, "deliverable")
    assert len(first.created) == 3 and second.created == [] and second.free_slots == 0
    assert BouncerBatch.select().where(BouncerBatch.status == BouncerBatchState.OUTSTANDING).count() == 3
    assert bouncer.count("create") == 3


def test_create_attaches_an_address_already_in_flight_instead_of_sending_it(app, bouncer):
    submit("alice", addresses("a", 5))
    run_cycle(app, CREATION, "deliverable")
    later = submit("bob", ["A0@example.com", "new@example.com"])
    report = run_cycle(app, CREATION, "deliverable")
    assert report.attached == 1
    assert bouncer.sent_addresses().count("a0@example.com") == 1
    assert "A0@example.com" not in bouncer.sent_addresses()
    assert statuses(later) == {SENT: 2}


def test_an_address_in_flight_is_found_at_either_end_of_the_ids_looked_up(app, bouncer):
    from bouncer.queue.packing import in_flight_batches_of
    submit("alice", ["lo@example.com", "mid@example.com", "hi@example.com"])
    run_cycle(app, CREATION, "deliverable")
    submit("bob", ["later@example.com"])
    ids = {email: global_id for global_id, email in EmailGlobal.select(EmailGlobal.id, EmailGlobal.email).tuples()}
    (ledger_id,) = {ledger for (ledger,) in BouncerBatch.select(BouncerBatch.id).tuples()}
    assert in_flight_batches_of("deliverable", {ids["lo@example.com"], ids["later@example.com"]}) \
        == {ids["lo@example.com"]: ledger_id}
    assert in_flight_batches_of("deliverable", {ids["hi@example.com"], ids["later@example.com"]}) \
        == {ids["hi@example.com"]: ledger_id}
    assert in_flight_batches_of("deliverable", {ids["mid@example.com"]}) == {ids["mid@example.com"]: ledger_id}
    assert in_flight_batches_of("deliverable", {ids["later@example.com"]}) == {}
    assert in_flight_batches_of("catchall", {ids["lo@example.com"], ids["hi@example.com"]}) == {}


def test_a_fresh_verdict_is_found_at_either_end_of_the_ids_looked_up(app):
    from bouncer.queue.packing import verdicts_of
    submit("alice", ["lo@example.com", "mid@example.com", "hi@example.com", "never@example.com"])
    ids = {email: global_id for global_id, email in EmailGlobal.select(EmailGlobal.id, EmailGlobal.email).tuples()}
    now = utcnow()
    for email in ("lo@example.com", "hi@example.com"):
        DeliverableResult.create(email_global=ids[email], status="deliverable", raw="{}", checked_at=now)
    cutoff = now - datetime.timedelta(days=1)
    lo, mid, hi, never = (ids[e] for e in ("lo@example.com", "mid@example.com", "hi@example.com",
                                           "never@example.com"))
    assert verdicts_of("deliverable", {lo, mid}, cutoff, now) == ({lo}, set())
    assert verdicts_of("deliverable", {mid, hi}, cutoff, now) == ({hi}, set())
    assert verdicts_of("deliverable", {lo, hi}, cutoff, now) == ({lo, hi}, set())
    assert verdicts_of("deliverable", {mid}, cutoff, now) == verdicts_of("deliverable", {never}, cutoff, now) \
        == (set(), set())
    assert verdicts_of("catchall", {lo, hi}, cutoff, now) == (set(), set())


def test_create_completes_addresses_with_a_fresh_cached_verdict_without_a_credit(app, bouncer):
    first = submit("alice", ["cached@example.com"])
    EmailGlobal_id = EmailGlobal.get(EmailGlobal.email == "cached@example.com").id
    DeliverableResult.create(email_global=EmailGlobal_id, status="deliverable", raw="{}",
                             checked_at=utcnow() - datetime.timedelta(days=2))
    report = run_cycle(app, CREATION, "deliverable")
    assert report.cached == 1 and bouncer.count("create") == 0
    assert UserBatch.get_by_id(first).status == "completed"


def test_create_sends_again_when_the_cached_verdict_is_too_old_or_cache_disabled(app, bouncer):
    submit("alice", ["old@example.com", "fresh@example.com"])
    for address, age in (("old@example.com", 40), ("fresh@example.com", 1)):
        gid = EmailGlobal.get(EmailGlobal.email == address).id
        DeliverableResult.create(email_global=gid, status="deliverable", raw="{}",
                                 checked_at=utcnow() - datetime.timedelta(days=age))
    run_cycle(with_settings(app, result_cache_days=30), CREATION, "deliverable")
    assert bouncer.sent_addresses() == ["old@example.com"]
    submit("bob", ["fresh@example.com"])
    run_cycle(with_settings(app, result_cache_days=0), CREATION, "deliverable")
    assert bouncer.sent_addresses() == ["old@example.com", "fresh@example.com"]


@pytest.mark.parametrize("status", [500, 503, requests.exceptions.ReadTimeout])
def test_create_failed_call_requeues_its_emails_and_moves_on_fifo(app, bouncer, status):
    submit("alice", addresses("a", 30))
    bouncer.fail_next(status, kind="create")
    report = run_cycle(app, CREATION, "deliverable")
    assert len(report.failed_calls) == 1 and len(report.created) == 2
    # The failed attempt's emails (the 10 oldest) wait; the next 20 went out in this cycle.
    assert bouncer.sent_addresses() == addresses("a", 30)[10:]
    states = row_states()
    rows = {p: states[r] for r, p in UserBatchEmail.select(UserBatchEmail.id, UserBatchEmail.position).tuples()}
    assert all(rows[p] == RowState.QUEUED for p in range(1, 11))
    # Refused: rejected. Unanswered: Bouncer may have created it, so a counted possible orphan.
    timed_out = status is requests.exceptions.ReadTimeout
    attempt = BouncerBatch.get(BouncerBatch.status == (BouncerBatchState.ABANDONED if timed_out
                                                       else BouncerBatchState.REJECTED))
    assert attempt.failure_reason
    assert count_possible_orphans("deliverable") == (1 if timed_out else 0)
    # Not retried in this cycle, but first in line for the next one.
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.sent_addresses()[-10:] == addresses("a", 30)[:10]


def test_create_timed_out_after_bouncer_created_the_batch_sends_its_emails_again(app, bouncer):
    # Bouncer acted on the create but its answer came too late: the one window design.md's
    # invariant 6 leaves open. The batch at Bouncer is an orphan nobody follows.
    submit("alice", addresses("a", 30))
    bouncer.fail_next("timeout", kind="create")
    report = run_cycle(app, CREATION, "deliverable")
    assert len(report.failed_calls) == 1 and len(report.created) == 2
    assert len(bouncer.batches) == 3 and bouncer.sent_addresses() == addresses("a", 30)
    assert BouncerBatch.get(BouncerBatch.status == BouncerBatchState.ABANDONED).failure_reason
    assert count_possible_orphans("deliverable") == 1
    assert statuses(UserBatch.get().id) == {RowState.QUEUED: 10, SENT: 20}
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.sent_addresses()[-10:] == addresses("a", 30)[:10]


@pytest.mark.parametrize("status,words", [
    (429, "rate limited"), (402, "buy more credits"), (401, "BOUNCER_API_KEY")])
def test_create_rate_limit_credits_or_auth_error_ends_the_cycle(app, bouncer, caplog, status, words):
    submit("alice", addresses("a", 30))
    bouncer.fail_next(status, kind="create")
    report = run_cycle(app, CREATION, "deliverable")
    assert bouncer.count("create") == 1 and report.created == []
    assert words in report.stopped and words in caplog.text
    assert statuses(UserBatch.get().id) == {RowState.QUEUED: 30}
    # The batch reserved during the refused call was cancelled: only the refused attempt is left.
    assert [b.status for b in BouncerBatch.select()] == [BouncerBatchState.REJECTED]
    assert BouncerBatchEmail.select().count() == 0 and rode_on() == {}


def test_create_reserves_the_next_batch_while_bouncer_answers_the_call_before(app, bouncer):
    """Each create call goes out on a thread while the cycle reserves the next batch; the call
    is answered before the next one goes out."""
    import threading
    submit("alice", addresses("a", 30))
    real, seen, lock = app.client.create_batch, [], threading.Lock()

    def create_batch(check_type, emails, callback_url=None):
        with lock:
            seen.append(("call", emails[0]))
        if len(seen) == 1:   # the first call waits for the next reservation to be written
            deadline = time.monotonic() + 10
            while reserved_now() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(("reserved beside it", reserved_now()))
            database.close()
        return real(check_type, emails, callback_url=callback_url)

    app.client.create_batch = create_batch
    report = run_cycle(app, CREATION, "deliverable")
    assert len(report.created) == 3 and bouncer.sent_addresses() == addresses("a", 30)
    assert seen == [("call", "a0@example.com"), ("reserved beside it", 2),
                    ("call", "a10@example.com"), ("call", "a20@example.com")]


def test_a_shutdown_during_a_call_stores_its_answer_and_sends_nothing_more(app, bouncer):
    from bouncer.cycles.runner import SHUTDOWN
    submit("alice", addresses("a", 30))
    real = app.client.create_batch

    def create_batch(check_type, emails, callback_url=None):
        SHUTDOWN.set()      # a SIGTERM while the call is on the wire
        time.sleep(0.2)     # the cycle goes on reserving the next batch meanwhile
        return real(check_type, emails, callback_url=callback_url)

    app.client.create_batch = create_batch
    try:
        report = run_cycle(app, CREATION, "deliverable")
    finally:
        SHUTDOWN.clear()
        app.client.create_batch = real
    assert report.stopped == "shutdown requested"
    assert [(b.status, b.quantity) for b in BouncerBatch.select()] == [(BouncerBatchState.OUTSTANDING, 10)]
    assert bouncer.sent_addresses() == addresses("a", 10)
    assert statuses(UserBatch.get().id) == {SENT: 10, RowState.QUEUED: 20}
    again = run_cycle(app, CREATION, "deliverable")
    assert bouncer.sent_addresses() == addresses("a", 30), again.summary()


def reserved_now():
    return BouncerBatch.select().where(BouncerBatch.status == BouncerBatchState.RESERVED).count()


def test_create_stops_when_the_request_budget_is_used_up(app, bouncer):
    from bouncer.queue.ratelimit import take_request_slot
    for _ in range(app.settings.rate_limit_buffer):
        assert take_request_slot("status", app.settings.rate_limit_buffer)
    submit("alice", addresses("a", 5))
    report = run_cycle(app, CREATION, "deliverable")
    assert report.created == [] and "budget" in report.stopped
    assert bouncer.count("create") == 0
    # The reservation made before the budget said no is undone without a trace.
    assert statuses(UserBatch.get().id) == {RowState.QUEUED: 5}
    assert BouncerBatch.select().count() == 0 and BouncerBatchEmail.select().count() == 0
    assert rode_on() == {}


def test_create_skips_when_another_cycle_holds_the_lock(app, bouncer):
    from bouncer.cycles.locks import CycleLock
    submit("alice", addresses("a", 5))
    with CycleLock(app.redis, "creation", "deliverable") as held:
        assert held
        report = run_cycle(app, CREATION, "deliverable")
    assert report.skipped and bouncer.count("create") == 0


def dead_cycles_reservation(app, emails, called):
    """What a cycle that died leaves: a reservation past RESERVATION_TIMEOUT without a Bouncer id,
    marked as sent if it died during its call."""
    from bouncer.queue.ledger import note_calling
    long_ago = utcnow() - datetime.timedelta(seconds=app.settings.reservation_timeout + 1)
    reservation = reserve_next_batch("deliverable", 10, 30, 3, now=long_ago)
    assert len(reservation.emails) == emails
    if called:
        assert note_calling(reservation.ledger_id, now=long_ago)
    return reservation


def test_create_abandons_a_dead_cycles_reservation_whose_call_went_out_as_a_possible_orphan(app, bouncer, caplog):
    submit("alice", addresses("a", 5))
    reservation = dead_cycles_reservation(app, 5, called=True)
    report = run_cycle(app, CREATION, "deliverable")
    assert report.abandoned == [(reservation.ledger_id, 5)] and report.released == []
    assert "possible orphan" in caplog.text and count_possible_orphans("deliverable") == 1
    assert BouncerBatch.get_by_id(reservation.ledger_id).status == BouncerBatchState.ABANDONED
    assert len(report.created) == 1 and sorted(bouncer.sent_addresses()) == sorted(addresses("a", 5))


def test_create_cancels_a_dead_cycles_reservation_that_was_never_called(app, bouncer, caplog):
    submit("alice", addresses("a", 5))
    reservation = dead_cycles_reservation(app, 5, called=False)
    report = run_cycle(app, CREATION, "deliverable")
    assert report.released == [(reservation.ledger_id, 5)] and report.abandoned == []
    assert "possible orphan" not in caplog.text and count_possible_orphans("deliverable") == 0
    # The ledger keeps no trace of it (SQLite may give its id to the batch sent now).
    assert [b.status for b in BouncerBatch.select()] == ["outstanding"]
    assert len(report.created) == 1 and bouncer.sent_addresses() == addresses("a", 5)


@pytest.mark.parametrize("called", [True, False])
def test_create_sends_a_dead_cycles_reserved_emails_before_newer_ones(app, bouncer, called):
    submit("alice", addresses("a", 5))
    reservation = dead_cycles_reservation(app, 5, called)
    submit("bob", addresses("b", 20))
    report = run_cycle(app, CREATION, "deliverable")
    assert (report.abandoned if called else report.released) == [(reservation.ledger_id, 5)]
    # FIFO: the released emails are the oldest pending, so they lead the first batch.
    assert bouncer.sent_addresses() == addresses("a", 5) + addresses("b", 20)


def test_create_sends_the_emails_of_an_earlier_cycles_failed_call_first(app, bouncer):
    # A cycle whose call failed and that died before queueing its emails again leaves them
    # parked on the rejected attempt: the next cycle queues them before it packs anything.
    from bouncer.queue.ledger import reject_reservation
    submit("alice", addresses("a", 10))
    reservation = reserve_next_batch("deliverable", 10, 30, 3)
    reject_reservation(reservation.ledger_id, "Bouncer answered 500")
    submit("bob", addresses("b", 10))
    assert statuses(UserBatch.get(UserBatch.user_id == "alice").id) == {SENT: 10}
    report = run_cycle(app, CREATION, "deliverable")
    assert report.requeued == 10
    assert bouncer.sent_addresses() == addresses("a", 10) + addresses("b", 10)


def test_create_with_nothing_to_tidy_writes_first_its_reservation(app, bouncer, caplog):
    """Admission, the rate-limit history, failed attempts and dead reservations are looked at
    with reads: with nothing to do there, the first write of a cycle (on SQLite, the first
    write lock it waits for, behind an ingest) is its reservation."""
    submit("alice", addresses("a", 40))
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now(next(iter(bouncer.batches)))
    run_cycle(app, STATUS, "deliverable")
    with caplog.at_level(logging.DEBUG, logger="peewee"):
        report = run_cycle(app, CREATION, "deliverable")
    assert len(report.created) == 1
    statements = [" ".join(str(r.msg[0] if isinstance(r.msg, tuple) else r.msg).split())
                  for r in caplog.records if r.name == "peewee"]
    ledger_row = next(i for i, sql in enumerate(statements) if sql.startswith('INSERT INTO "bouncer_batches"'))
    # The reservation's first write: its rows taken out of the line, just before its ledger row.
    first = ledger_row - 1
    assert statements[first].startswith('DELETE FROM "queued_emails"')
    writes = ("BEGIN", "INSERT", "UPDATE", "DELETE")
    # PostgreSQL: none; SQLite: the reservation's own BEGIN IMMEDIATE.
    assert [sql for sql in statements[:first] if sql.startswith(writes)] in ([], ["BEGIN IMMEDIATE"])


def test_create_keeps_a_young_reservation_of_a_live_cycle(app, bouncer):
    submit("alice", addresses("a", 5))
    reservation = reserve_next_batch("deliverable", 10, 30, 3)
    report = run_cycle(app, CREATION, "deliverable")
    assert report.abandoned == [] and report.created == []
    assert BouncerBatch.get_by_id(reservation.ledger_id).status == BouncerBatchState.RESERVED


def test_create_never_sends_invalid_rows(app, bouncer):
    batch = submit("alice", ["good@example.com", "not an address"])
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.sent_addresses() == ["good@example.com"]
    assert statuses(batch) == {SENT: 1, "invalid": 1}


def test_create_catchall_uses_its_own_path_and_queue(app, bouncer):
    app = with_settings(app, catchall_path="/v1.1/email/verify/catchall/batch")
    app.client.catchall_path = "/v1.1/email/verify/catchall/batch"
    submit("alice", ["c@example.com"], check_type="catchall")
    submit("bob", ["d@example.com"], check_type="deliverable")
    run_cycle(app, CREATION, "catchall")
    [batch] = bouncer.batches.values()
    assert batch["emails"] == ["c@example.com"] and "/catchall/" in batch["path"]


def test_create_database_refuses_an_address_in_two_in_flight_batches(app, bouncer):
    from peewee import IntegrityError
    submit("alice", ["one@example.com"])
    run_cycle(app, CREATION, "deliverable")
    ledger = BouncerBatch.create(check_type="deliverable", quantity=1, reserved_at=utcnow())
    gid = EmailGlobal.get().id
    with pytest.raises(IntegrityError), database.atomic():
        BouncerBatchEmail.create(bouncer_batch=ledger, email_global=gid, check_type="deliverable",
                                 email_sent="one@example.com")


# -- a claim and a cancel racing for the same rows --------------------------------------------

@pytest.mark.parametrize("sent_before", [False, True])
def test_a_cancel_during_a_claim_waits_for_it_and_cancels_only_the_rows_left_in_line(
        app, bouncer, monkeypatch, sent_before):
    """The claim has taken two of alice's rows out of the line, not yet committed, when her batch
    is cancelled: the cancel waits for it (PostgreSQL: the user batch's lock, which a claim takes
    first when it makes the batch `processing`, else the rows' locks; SQLite: the write lock),
    then finds only the two rows still in line. The riding rows end with their verdicts, never
    cancelled, and the batch ends cancelled after them."""
    alice = submit("alice", addresses("a", 6 if sent_before else 4))
    if sent_before:      # the batch is `processing` already: this claim only sends its rows
        run_cycle(with_settings(app, batch_size=2, max_outstanding=1), CREATION, "deliverable")
    app = with_settings(app, batch_size=2, max_outstanding=2 if sent_before else 1)
    record_shares, seen = fairness.record_shares, {}

    def cancel_meanwhile(*args, **kwargs):
        record_shares(*args, **kwargs)
        seen["thread"], seen["waited"], seen["cancelled"] = in_another_thread(lambda: cancel_user_batch(app, alice))

    monkeypatch.setattr(fairness, "record_shares", cancel_meanwhile)
    report = run_cycle(app, CREATION, "deliverable")
    seen["thread"].join(30)
    sent = 4 if sent_before else 2
    assert seen["waited"] and seen["cancelled"] == [2]
    assert [quantity for _, _, quantity in report.created] == [2]
    assert bouncer.sent_addresses() == addresses("a", sent)
    assert statuses(alice) == {SENT: sent, RowState.CANCELLED: 2}
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert statuses(alice) == {RowState.DONE: sent, RowState.CANCELLED: 2}
    assert UserBatch.get_by_id(alice).status == "cancelled"


def test_a_claim_during_a_cancel_waits_for_it_and_sends_no_address_of_the_cancelled_rows(app, bouncer, monkeypatch):
    """Alice's batch is being cancelled, its rows taken out of the line but not yet committed,
    when a creation cycle packs the line (on PostgreSQL it still reads them there): the claim
    waits for the cancel, then takes only bob's rows, and Bouncer is sent bob's addresses alone,
    no credit spent on a cancelled row."""
    alice = submit("alice", addresses("a", 2))
    bob = submit("bob", addresses("b", 2))
    complete, seen = progress.complete_finished_batches, {}

    def create_meanwhile(*args, **kwargs):
        complete(*args, **kwargs)
        if "thread" not in seen:
            seen["thread"], seen["waited"], seen["report"] = in_another_thread(
                lambda: run_cycle(app, CREATION, "deliverable"))

    monkeypatch.setattr(progress, "complete_finished_batches", create_meanwhile)
    assert cancel_user_batch(app, alice) == 2
    seen["thread"].join(30)
    [report] = seen["report"]
    assert seen["waited"] and [quantity for _, _, quantity in report.created] == [2]
    assert bouncer.sent_addresses() == addresses("b", 2)
    assert statuses(alice) == {RowState.CANCELLED: 2} and statuses(bob) == {SENT: 2}
    assert BouncerBatchEmail.select().count() == 2
    assert [(share.user_id, share.addresses) for share in SentShare.select()] == [("bob", 2)]
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert statuses(bob) == {RowState.DONE: 2} and UserBatch.get_by_id(alice).status == "cancelled"


def test_a_cancel_during_an_admission_waits_for_it_and_cancels_the_rows_it_admitted(app, bouncer, monkeypatch):
    """A host's batch is being admitted, its rows queued but its counts not yet written, when it
    is cancelled: the cancel waits for the admission (which took the batch first, as every
    writer does), then cancels the rows it admitted. Neither waits for the other both ways (on
    PostgreSQL that would be a deadlock, one of them failed)."""
    batch = host_batch("alice", addresses("a", 3))
    count, seen = admission.count_admitted, {}

    def cancel_meanwhile(*args, **kwargs):
        seen["thread"], seen["waited"], seen["cancelled"] = in_another_thread(lambda: cancel_user_batch(app, batch))
        count(*args, **kwargs)

    monkeypatch.setattr(admission, "count_admitted", cancel_meanwhile)
    assert admission.admit("deliverable").admitted == 3
    seen["thread"].join(30)
    assert seen["waited"] and seen["cancelled"] == [3]
    assert statuses(batch) == {RowState.CANCELLED: 3} and UserBatch.get_by_id(batch).status == "cancelled"
    assert invariants.queue_matches_rows() == []
    assert run_cycle(app, CREATION, "deliverable").created == [] and bouncer.sent_addresses() == []


@pytest.mark.parametrize("called", [True, False])
def test_rows_of_a_cancelled_batch_on_a_dead_cycles_reservation_end_cancelled_not_sent_again(app, bouncer, called):
    """A cancel leaves rows riding to finish with their verdicts; rows riding on a reservation
    whose cycle died never get one there. Released back to the line, they end cancelled at once,
    and nothing is sent for them."""
    alice = submit("alice", addresses("a", 5))
    dead_cycles_reservation(app, 5, called)
    assert cancel_user_batch(app, alice) == 0 and statuses(alice) == {SENT: 5}
    report = run_cycle(app, CREATION, "deliverable")
    assert report.created == [] and bouncer.sent_addresses() == []
    assert statuses(alice) == {RowState.CANCELLED: 5} and UserBatch.get_by_id(alice).status == "cancelled"


def test_a_cancel_during_a_claim_that_ends_a_processing_batch_from_fresh_verdicts_waits_for_it(
        app, bouncer, monkeypatch):
    """Alice's batch, open again with two rows a host added after it completed (so
    `processing`), has them completed by the claim from verdicts stored for bob, which ends the
    batch, when she cancels it: the cancel waits for the claim (which took her batch first, as it
    may end it), then finds it completed. Neither waits for the other both ways."""
    submit("bob", addresses("a", 2))
    alice = host_batch("alice", ["first@example.com"])
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert UserBatch.get_by_id(alice).status == "completed"
    UserBatchEmail.insert_many([{"batch": alice, "position": 2 + i, "email": e}
                                for i, e in enumerate(addresses("a", 2))]).execute()
    complete, seen = progress.complete_rows_from_cache, {}

    def cancel_meanwhile(*args, **kwargs):
        complete(*args, **kwargs)
        assert UserBatch.get_by_id(alice).status == "processing"
        seen["thread"], seen["waited"], seen["cancelled"] = in_another_thread(lambda: cancel_user_batch(app, alice))

    monkeypatch.setattr(progress, "complete_rows_from_cache", cancel_meanwhile)
    report = run_cycle(app, CREATION, "deliverable")
    seen["thread"].join(30)
    [answer] = seen["cancelled"]
    assert seen["waited"] and isinstance(answer, Conflict), answer
    assert report.cached == 2 and report.created == []
    assert statuses(alice) == {RowState.DONE: 3} and UserBatch.get_by_id(alice).status == "completed"
