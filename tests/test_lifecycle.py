"""Bouncer's batch lifecycle, end to end with the sandbox over real HTTP on both databases:
greylisted verdicts re-checked after Bouncer's retryAfter and never before; stuck batches
finished with their verified part ingested; batches nobody wants any more finished; batches
deleted at Bouncer once their download is stored. Then the request slots these calls take,
and kill -9 between finish and ingest, and between ingest and delete."""
import datetime
import multiprocessing
import os
import signal
import time

import pytest
from conftest import addresses, in_another_thread, make_settings, statuses, submit, with_settings
from operating import basic, figure, operator_app, status_json

from bouncer.app import App
from bouncer.client import BouncerClient
from bouncer.cycles import ingest
from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.queue import ledger, line
from bouncer.reading.batches import batch_status, iter_results
from bouncer.sandbox.simulator import iso_utc, verdict_for
from bouncer.services.batches import cancel_user_batch
from bouncer.states import SENT, RowState
from bouncer.store.database import database, open_database, utcnow
from bouncer.store.models import (
    BouncerBatch, BouncerBatchEmail, DeliverableResult, EmailGlobal, QueuedEmail, RateLimitTracker,
    UserBatch, UserBatchEmail,
)
from bouncer.web import create_web_app
from support import invariants

GREYLIST_SECONDS = 1.5


def create(app, check_type="deliverable"):
    return run_cycle(app, CREATION, check_type)


def check(app, check_type="deliverable", now=None):
    return run_cycle(app, STATUS, check_type, now=now)


def complete_and_check(app, sandbox):
    sandbox.complete_now()
    return check(app)


def verdict_of(email):
    row = (DeliverableResult.select().join(EmailGlobal, on=(EmailGlobal.id == DeliverableResult.email_global))
           .where(EmailGlobal.email == email).get())
    return row


def results_of(batch_id):
    return [(r["email"], r["status"]) for r in iter_results(batch_id)]


def wait_past(moment):
    """Sleep until the clock has passed `moment` (naive UTC)."""
    while utcnow() <= moment:
        time.sleep(0.05)


def latest_retry_after():
    return max(q.not_before for q in QueuedEmail.select() if q.not_before is not None)


def greylist_everything(sandbox, seconds=GREYLIST_SECONDS):
    sandbox.greylist_rate, sandbox.greylist_seconds = 1.0, seconds


# -- greylisting --

def test_greylisted_addresses_are_checked_again_after_retry_after_and_never_before(sandbox_app, sandbox):
    app = sandbox_app
    greylist_everything(sandbox)
    alice = submit("alice", ["a@example.com", "b@example.com", "c@example.com"])
    bob = submit("bob", ["A@example.com"])                 # the same mailbox as alice's first
    create(app)
    report = complete_and_check(app, sandbox)
    assert report.ingested[0].rechecking == 4 and report.ingested[0].verified == 0
    assert statuses(alice) == {RowState.QUEUED: 3} and statuses(bob) == {RowState.QUEUED: 1}
    status = batch_status(alice)
    assert (status["status"], status["rechecking"], status["counts"]["pending"]) == ("processing", 3, 3)
    assert status_json()["check_types"]["deliverable"]["rechecking_emails"] == 4
    assert verdict_of("a@example.com").status == "unknown" and verdict_of("a@example.com").retry_after is not None

    # Not before retryAfter: nothing goes out, and a newcomer for the same mailbox waits too
    # (the greylisted unknown is no fresh verdict to answer it with).
    carol = submit("carol", ["a@example.com"])
    assert create(app).created == [] and sandbox.count("create") == 1
    assert statuses(carol) == {RowState.QUEUED: 1}

    wait_past(latest_retry_after())
    report = create(app)
    assert [quantity for _, _, quantity in report.created] == [3]        # one credit per mailbox
    assert BouncerBatch.get_by_id(report.created[0][0]).rechecks == 3
    complete_and_check(app, sandbox)

    for batch_id, emails in ((alice, ["a@example.com", "b@example.com", "c@example.com"]),
                             (bob, ["A@example.com"]), (carol, ["a@example.com"])):
        assert results_of(batch_id) == [(e, verdict_for(e)["status"]) for e in emails]
        assert batch_status(batch_id)["status"] == "completed" and batch_status(batch_id)["rechecking"] == 0
    assert verdict_of("a@example.com").retry_after is None
    assert sandbox.stats()["early_retries"] == 0 and sandbox.stats()["greylisted"] == 3
    totals = status_json()["check_types"]["deliverable"]
    assert (totals["credits_spent_total"], totals["credits_rechecks_total"], totals["rechecking_emails"]) == (6, 3, 0)
    assert invariants.every_email_finished() == []


def test_a_greylisted_unknown_never_answers_a_later_submission_from_the_cache(sandbox_app, sandbox):
    app = with_settings(sandbox_app, unknown_rechecks=0)
    greylist_everything(sandbox, seconds=0)
    first = submit("alice", ["a@example.com"])
    create(app)
    complete_and_check(app, sandbox)
    assert results_of(first) == [("a@example.com", "unknown")]
    again = submit("bob", ["a@example.com"])
    report = create(app)
    assert report.cached == 0 and len(report.created) == 1      # sent again, not answered from the cache
    complete_and_check(app, sandbox)
    assert results_of(again) == [("a@example.com", verdict_for("a@example.com")["status"])]


def test_unknown_rechecks_0_keeps_the_unknown(sandbox_app, sandbox):
    app = with_settings(sandbox_app, unknown_rechecks=0)
    greylist_everything(sandbox)
    batch = submit("alice", addresses("g", 3))
    create(app)
    report = complete_and_check(app, sandbox)
    assert report.ingested[0].rechecking == 0 and report.ingested[0].verified == 3
    assert results_of(batch) == [(e, "unknown") for e in addresses("g", 3)]
    assert batch_status(batch)["status"] == "completed"
    assert QueuedEmail.select().count() == 0


def test_a_retry_after_further_ahead_than_the_max_delay_keeps_the_unknown(sandbox_app, sandbox):
    app = sandbox_app
    greylist_everything(sandbox, seconds=app.settings.unknown_recheck_max_delay + 600)
    batch = submit("alice", addresses("g", 3))
    create(app)
    complete_and_check(app, sandbox)
    assert results_of(batch) == [(e, "unknown") for e in addresses("g", 3)]
    assert batch_status(batch)["status"] == "completed"
    # Not waited for, so a newcomer is not held back either: it is sent at once.
    later = submit("bob", addresses("g", 1))
    assert len(create(app).created) == 1 and statuses(later) == {SENT: 1}


def test_a_row_is_checked_again_at_most_unknown_rechecks_times(app, bouncer):
    app = with_settings(app, unknown_rechecks=2)

    def greylisted_again(records):
        soon = iso_utc(time.time() + 0.3)
        return [dict(r, status="unknown", reason="timeout", retryAfter=soon) for r in records]
    bouncer.alter_downloads(greylisted_again)
    batch = submit("alice", ["a@example.com"])
    sends = []
    for _ in range(3):
        wait_past(utcnow() + datetime.timedelta(seconds=0.4))
        sends.append(len(create(app).created))
        bouncer.complete_now()
        check(app)
    assert sends == [1, 1, 1]                     # the first try and two re-checks, then final
    assert results_of(batch) == [("a@example.com", "unknown")]
    assert UserBatchEmail.get().rechecks == 2 and batch_status(batch)["status"] == "completed"
    assert create(app).created == []


def test_a_greylisted_row_of_a_cancelled_user_batch_is_not_sent_again(app, bouncer):
    greylist_everything(bouncer)
    alice = submit("alice", addresses("a", 3))
    bob = submit("bob", ["a0@example.com"])                # bob still wants the first one
    create(app)
    cancel_user_batch(app, alice)
    bouncer.complete_now()
    report = check(app)
    assert report.ingested[0].rechecking == 1                 # bob's row only
    assert statuses(alice) == {RowState.DONE: 3} and batch_status(alice)["status"] == "cancelled"
    assert results_of(alice) == [(e, "unknown") for e in addresses("a", 3)]
    assert statuses(bob) == {RowState.QUEUED: 1} and batch_status(bob)["rechecking"] == 1


def test_a_cancel_during_an_ingest_waits_for_it_and_cancels_the_rows_it_put_back_for_a_recheck(
        app, bouncer, monkeypatch):
    """Alice's batch is cancelled while the ingest of her greylisted verdicts holds their rows
    back in line for a re-check, not yet committed: the cancel waits for the ingest (which took
    the user batch first, as every writer does), then cancels those rows. None is sent again
    (on PostgreSQL the cancel would otherwise miss the rows not yet committed, and they would
    go out after their `retryAfter`)."""
    greylist_everything(bouncer)
    alice = submit("alice", addresses("a", 2))
    create(app)
    requeue, seen = line.requeue_for_recheck, {}

    def cancel_meanwhile(*args, **kwargs):
        back = requeue(*args, **kwargs)
        seen["thread"], seen["waited"], seen["cancelled"] = in_another_thread(lambda: cancel_user_batch(app, alice))
        return back

    monkeypatch.setattr(line, "requeue_for_recheck", cancel_meanwhile)
    bouncer.complete_now()
    assert check(app).ingested[0].rechecking == 2
    seen["thread"].join(30)
    assert seen["waited"] and seen["cancelled"] == [2]
    assert statuses(alice) == {RowState.CANCELLED: 2} and batch_status(alice)["status"] == "cancelled"
    wait_past(utcnow() + datetime.timedelta(seconds=GREYLIST_SECONDS))
    assert create(app).created == [] and bouncer.sent_addresses() == addresses("a", 2)


def test_the_packer_walks_past_a_row_whose_recheck_is_not_yet_due_and_keeps_its_place(app, bouncer):
    """Its place kept in line, and the not-before time alone holding it back: no verdict of its
    address is stored to hold it (a verdict pruned, say)."""
    first = submit("alice", ["a@example.com"])
    later = submit("bob", ["b@example.com", "c@example.com"])
    (QueuedEmail.update(not_before=utcnow() + datetime.timedelta(seconds=1), rechecks=1)
     .where(QueuedEmail.batch_id == first).execute())
    UserBatchEmail.update(rechecks=1).where(UserBatchEmail.batch == first).execute()
    assert [quantity for _, _, quantity in create(app).created] == [2]
    assert bouncer.sent_addresses() == ["b@example.com", "c@example.com"]
    assert batch_status(first)["rechecking"] == 1 and statuses(later) == {SENT: 2}
    wait_past(utcnow() + datetime.timedelta(seconds=1.1))
    report = create(app)
    assert bouncer.sent_addresses()[2:] == ["a@example.com"]
    assert BouncerBatch.get_by_id(report.created[0][0]).rechecks == 1


# -- finishing a stuck batch --

def overdue(app):
    """A moment past BATCH_TIMEOUT for every batch sent so far."""
    return utcnow() + datetime.timedelta(seconds=app.settings.batch_timeout + 5)


def test_a_stuck_batch_is_finished_after_batch_timeout_and_its_verified_part_ingested(sandbox_app, sandbox):
    app = sandbox_app
    sandbox.credits = 100
    emails = addresses("s", 10)
    batch = submit("alice", emails)
    create(app)
    [bouncer_id] = sandbox.batches
    sandbox.set_processed(bouncer_id, 6)             # Bouncer got through six of them
    assert check(app).finishing == [] and sandbox.count("finish") == 0      # not yet overdue

    report = check(app, now=overdue(app))
    assert report.finishing == [BouncerBatch.get().id] and sandbox.count("finish") == 1
    assert status_json()["check_types"]["deliverable"]["finishing_batches"] == 1
    report = check(app, now=overdue(app))
    assert (report.ingested[0].verified, report.ingested[0].missing, report.ingested[0].refunded) == (6, 4, 4)

    rows = list(UserBatchEmail.select().where(UserBatchEmail.batch == batch).order_by(UserBatchEmail.position))
    assert [r.status for r in rows] == ["done"] * 6 + ["failed"] * 4
    assert rows[-1].failure_reason == ("Bouncer batch %s was finished before verifying it (Bouncer batch did not "
                                       "complete within BATCH_TIMEOUT (86400 s))" % bouncer_id)
    assert results_of(batch)[:6] == [(e, verdict_for(e)["status"]) for e in emails[:6]]
    assert UserBatch.get_by_id(batch).status == "completed"
    ledger = BouncerBatch.get()
    assert (ledger.status, ledger.credits, ledger.refunded) == ("completed", 6, 4)
    assert sandbox.credits == 100 - 10 + 4
    assert_figures_agree(app, credits_refunded_total=4, emails_verified_total=6)
    assert sandbox.count("finish") == 1 and sandbox.count("download") == 1


def assert_figures_agree(app, **expected):
    """status --json, /metrics and the console show the same figures, `expected` among them."""
    answer = status_json()["check_types"]["deliverable"]
    assert {key: answer[key] for key in expected} == expected
    web = create_web_app(operator_app(app)).test_client()
    metrics = web.get("/metrics").get_data(as_text=True)
    assert 'bouncer_credits_refunded_total{check_type="deliverable"} %s' % float(answer["credits_refunded_total"]) \
        in metrics
    assert 'bouncer_credits_rechecks_total{check_type="deliverable"} %s' % float(answer["credits_rechecks_total"]) \
        in metrics
    page = web.get("/", headers=basic()).get_data(as_text=True)
    for key in expected:
        path = "check_types.deliverable.%s" % key
        assert 'data-figure="%s" data-value="%s"' % (path, figure(status_json(), path)) in page


# -- finishing what nobody wants --

def test_a_batch_of_cancelled_rows_is_finished_and_its_credits_come_back(sandbox_app, sandbox):
    app = sandbox_app
    alice = submit("alice", addresses("a", 10))
    create(app)
    [bouncer_id] = sandbox.batches
    sandbox.set_processed(bouncer_id, 4)
    cancel_user_batch(app, alice)
    assert batch_status(alice)["status"] == "processing"         # its rows are in flight
    report = check(app)
    assert report.finishing == [BouncerBatch.get().id] and sandbox.count("finish") == 1
    # Nobody joins a batch being finished: bob's row of one of its addresses waits for it to end.
    bob = submit("bob", ["a1@example.com"])
    create(app)
    assert statuses(bob) == {RowState.QUEUED: 1} and sandbox.count("create") == 1

    report = check(app)
    assert (report.ingested[0].verified, report.ingested[0].missing, report.ingested[0].refunded) == (4, 6, 6)
    assert statuses(alice) == {RowState.DONE: 4, RowState.CANCELLED: 6}
    assert batch_status(alice)["status"] == "cancelled"
    create(app)
    complete_and_check(app, sandbox)
    assert results_of(bob) == [("a1@example.com", verdict_for("a1@example.com")["status"])]
    assert invariants.every_email_finished() == []


def test_a_batch_whose_rows_were_all_erased_is_finished_and_its_credits_come_back(sandbox_app, sandbox):
    from bouncer.services import erasure
    app = sandbox_app
    submit("alice", addresses("a", 10))
    create(app)
    [bouncer_id] = sandbox.batches
    sandbox.set_processed(bouncer_id, 4)
    assert erasure.forget_user(app, "alice", who="test").erased.rows == 10
    assert check(app).finishing == [BouncerBatch.get().id] and sandbox.count("finish") == 1
    report = check(app)
    assert report.ingested[0].verified == 0 and report.ingested[0].refunded == 6   # nothing of alice stored
    assert not UserBatch.select().exists() and invariants.every_email_finished() == []


def test_a_batch_shared_with_another_users_live_rows_is_not_finished(sandbox_app, sandbox):
    app = sandbox_app
    alice = submit("alice", addresses("a", 5))
    bob = submit("bob", addresses("b", 5))
    create(app)
    assert BouncerBatch.select().count() == 1
    cancel_user_batch(app, alice)
    check(app)
    check(app)
    assert sandbox.count("finish") == 0 and BouncerBatch.get().finish_reason is None
    complete_and_check(app, sandbox)
    assert statuses(alice) == {RowState.DONE: 5} and batch_status(alice)["status"] == "cancelled"
    assert statuses(bob) == {RowState.DONE: 5} and batch_status(bob)["status"] == "completed"


def test_a_refused_finish_of_an_unwanted_batch_ends_its_rows_cancelled_not_failed(app, bouncer):
    alice = submit("alice", addresses("a", 5))
    create(app)
    [bouncer_id] = bouncer.batches
    bouncer.set_status(bouncer_id, "queued")
    bouncer.fail_next(400, kind="finish", body={"status": 400, "error": "Bad Request",
                                                "message": "batch has to be running to finish"})
    cancel_user_batch(app, alice)
    report = check(app)
    assert len(report.failed) == 1 and "every row on it was cancelled" in report.failed[0][1]
    assert statuses(alice) == {RowState.CANCELLED: 5} and batch_status(alice)["status"] == "cancelled"


def test_no_row_joins_a_batch_marked_to_be_finished_nor_is_a_batch_with_a_live_row_marked(app, bouncer):
    alice = submit("alice", addresses("a", 3))
    create(app)
    marked = BouncerBatch.get()
    bob = submit("bob", ["a0@example.com"])
    UserBatch.update(cancelled_at=utcnow()).where(UserBatch.id == alice).execute()
    row = UserBatchEmail.get(UserBatchEmail.batch == bob)
    # A live row riding keeps it; without one, it is marked; once marked, nothing joins it.
    assert ledger.want_finish(marked.id, "test") is True
    joining = {marked.id: [(row.id, bob)]}
    assert ledger.lock_joinable(joining) == set() and ledger.attach_to_in_flight(joining, set(), None) == 0
    assert statuses(bob) == {RowState.QUEUED: 1}
    other = submit("carol", addresses("c", 3))
    create(app)
    carried = BouncerBatch.get(BouncerBatch.id != marked.id)
    dave = submit("dave", ["c0@example.com"])
    create(app)                                            # dave's row rides on carol's batch
    UserBatch.update(cancelled_at=utcnow()).where(UserBatch.id == other).execute()
    assert ledger.unwanted_batches("deliverable") == []
    assert ledger.finish_if_unwanted(carried.id, "test") is False
    assert statuses(dave) == {SENT: 1}


# -- deleting at Bouncer --

def test_batches_are_deleted_at_bouncer_only_after_their_download_is_stored(sandbox_app, sandbox):
    app = with_settings(sandbox_app, delete_results=True)
    batch = submit("alice", addresses("d", 5))
    create(app)
    check(app)
    assert sandbox.count("delete") == 0                    # still running: nothing stored yet
    sandbox.complete_now()
    report = check(app)
    assert report.deleted == 1 and sandbox.batches == {}
    kinds = [r["kind"] for r in sandbox.requests]
    assert kinds.index("download") < kinds.index("delete")
    assert BouncerBatch.get().deleted_at is not None and statuses(batch) == {RowState.DONE: 5}
    check(app)
    assert sandbox.count("delete") == 1                    # deleted once


def test_a_failed_delete_is_tried_again_by_a_later_cycle_and_never_holds_up_an_ingest(sandbox_app, sandbox):
    app = with_settings(sandbox_app, delete_results=True)
    first = submit("alice", addresses("d", 5))
    create(app)
    sandbox.complete_now()
    sandbox.fail_next(503, kind="delete")
    report = check(app)
    assert report.ingested and report.deleted == 0 and report.errors == 1
    assert statuses(first) == {RowState.DONE: 5} and BouncerBatch.get().deleted_at is None
    second = submit("bob", addresses("e", 5))
    create(app)
    sandbox.forget(BouncerBatch.get(BouncerBatch.status == "outstanding").bouncer_id)   # gone at Bouncer
    report = check(app)
    assert report.deleted == 1 and statuses(second) == {RowState.FAILED: 5}   # its 404 fails it as before
    assert BouncerBatch.get(BouncerBatch.status == "completed").deleted_at is not None


def test_a_delete_bouncer_answers_404_counts_as_deleted(sandbox_app, sandbox):
    app = with_settings(sandbox_app, delete_results=True)
    submit("alice", addresses("d", 5))
    create(app)
    sandbox.complete_now()
    check(app, now=None)
    BouncerBatch.update(deleted_at=None).execute()         # as if the note of the delete was lost
    check(app)
    assert sandbox.count("delete") == 2 and BouncerBatch.get().deleted_at is not None


def test_nothing_is_deleted_unless_asked(sandbox_app, sandbox):
    submit("alice", addresses("d", 5))
    create(sandbox_app)
    complete_and_check(sandbox_app, sandbox)
    check(sandbox_app)
    assert sandbox.count("delete") == 0 and len(sandbox.batches) == 1


# -- the request slots finish and delete take --

def fill_request_budget(app, leave):
    """Record requests so that only `leave` slots are left in the rolling minute."""
    now = utcnow()
    RateLimitTracker.insert_many([{"requested_at": now, "kind": "status", "check_type": "deliverable"}]
                                 * (app.settings.rate_limit_buffer - leave)).execute()


def slot_kinds():
    return [r.kind for r in RateLimitTracker.select().order_by(RateLimitTracker.id)]


def test_a_finish_takes_a_request_slot_of_its_own_first(app, bouncer):
    submit("alice", addresses("a", 5))
    create(app)
    RateLimitTracker.delete().execute()
    check(app, now=overdue(app))
    assert slot_kinds() == ["status", "finish"] and bouncer.count("finish") == 1


def test_no_finish_without_a_request_slot(app, bouncer):
    submit("alice", addresses("a", 5))
    create(app)
    RateLimitTracker.delete().execute()
    fill_request_budget(app, leave=1)                      # the status check takes the last one
    report = check(app, now=overdue(app))
    assert report.stopped == "request budget used up before a finish"
    assert bouncer.count("finish") == 0 and BouncerBatch.get().finish_accepted_at is None
    RateLimitTracker.delete().execute()
    assert check(app, now=overdue(app)).finishing == [BouncerBatch.get().id]    # asked next cycle


def test_a_delete_takes_a_request_slot_of_its_own_first(app, bouncer):
    app = with_settings(app, delete_results=True)
    submit("alice", addresses("a", 5))
    create(app)
    bouncer.complete_now()
    RateLimitTracker.delete().execute()
    check(app)
    assert slot_kinds() == ["status", "download", "delete"] and bouncer.count("delete") == 1


def test_no_delete_without_a_request_slot(app, bouncer):
    app = with_settings(app, delete_results=True)
    submit("alice", addresses("a", 5))
    create(app)
    bouncer.complete_now()
    RateLimitTracker.delete().execute()
    fill_request_budget(app, leave=2)                      # status and download take them
    report = check(app)
    assert report.ingested and report.stopped == "request budget used up before a delete"
    assert bouncer.count("delete") == 0 and BouncerBatch.get().deleted_at is None


# -- kill -9 between finish and ingest, between ingest and delete --

def install_kill_switch(step):
    """Make this process die by SIGKILL at `step` of a status cycle."""
    def after(module, name):
        real = getattr(module, name)

        def call_then_die(*args, **kwargs):
            real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(module, name, call_then_die)

    def before(module, name):
        setattr(module, name, lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))

    {
        "marked_to_finish": lambda: after(ledger, "want_finish"),
        "finish_answered": lambda: after(BouncerClient, "finish_batch"),
        "ingesting": lambda: after(ingest, "upsert_results"),
        "ingested": lambda: after(ingest, "ingest_download"),
        "delete_answered": lambda: after(BouncerClient, "delete_batch"),
        "deleting": lambda: before(BouncerClient, "delete_batch"),
    }[step]()


def status_cycle_until_killed(database_url, redis_url, api_url, step, overrides, now):
    open_database(database_url)
    install_kill_switch(step)
    run_cycle(App(make_settings(database_url, api_url=api_url, redis_url=redis_url, **overrides)), STATUS,
              "deliverable", now=now)
    os._exit(0)   # the step never came: the test fails on the exit code


def kill_status_cycle(app, sandbox, step, overrides, now=None):
    database.close()
    child = multiprocessing.get_context("spawn").Process(target=status_cycle_until_killed, args=(
        app.settings.database_url, app.settings.redis_url, sandbox.url, step, overrides, now))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    database.connect(reuse_if_open=True)
    app.redis.delete(*app.redis.keys("bouncer:lock:*") or ["-"])   # the dead holder's lock, expired


def stored_verdicts():
    return {gid: (status, raw) for gid, status, raw in
            DeliverableResult.select(DeliverableResult.email_global, DeliverableResult.status,
                                     DeliverableResult.raw).tuples()}


@pytest.mark.parametrize("step", ["marked_to_finish", "finish_answered", "ingesting"])
def test_kill_9_between_finish_and_ingest_loses_nothing(sandbox_app, sandbox, step):
    app = sandbox_app
    emails = addresses("k", 10)                            # one Bouncer batch
    batch = submit("alice", emails)
    create(app)
    [bouncer_id] = sandbox.batches
    sandbox.set_processed(bouncer_id, 6)
    if step == "ingesting":
        check(app, now=overdue(app))                       # finished at Bouncer; ingested next cycle
    kill_status_cycle(app, sandbox, step, {}, now=overdue(app))
    assert statuses(batch) == {SENT: 10}                   # nothing ended by the dead cycle
    for _ in range(3):
        check(app, now=overdue(app))
    assert statuses(batch) == {RowState.DONE: 6, RowState.FAILED: 4}
    assert results_of(batch)[:6] == [(e, verdict_for(e)["status"]) for e in emails[:6]]
    assert invariants.every_email_finished() == [] and BouncerBatchEmail.select().count() == 0
    assert sandbox.count("finish") == 1                    # a finished batch is not finished twice
    ledger = BouncerBatch.get()
    assert (ledger.status, ledger.refunded) == ("completed", 4)


@pytest.mark.parametrize("step", ["ingesting", "ingested", "deleting", "delete_answered"])
def test_kill_9_between_ingest_and_delete_loses_nothing_and_deletes_only_what_is_stored(sandbox_app, sandbox, step):
    app = with_settings(sandbox_app, delete_results=True)
    emails = addresses("k", 10)                            # one Bouncer batch
    batch = submit("alice", emails)
    create(app)
    sandbox.complete_now()
    kill_status_cycle(app, sandbox, step, {"delete_results": True})
    stored = stored_verdicts()
    if step == "ingesting":
        # Died inside the ingest's transaction: nothing stored, and nothing deleted at Bouncer.
        assert stored == {} and statuses(batch) == {SENT: 10} and sandbox.count("delete") == 0
    else:
        assert len(stored) == 10 and statuses(batch) == {RowState.DONE: 10}
    check(app)
    check(app)
    assert statuses(batch) == {RowState.DONE: 10}
    assert results_of(batch) == [(e, verdict_for(e)["status"]) for e in emails]
    if stored:
        assert stored_verdicts() == stored                  # downloaded once: the verdicts kept as stored
        assert sandbox.count("download") == 1
    assert BouncerBatch.get().deleted_at is not None and sandbox.batches == {}
    kinds = [r["kind"] for r in sandbox.requests]
    assert kinds.index("delete") > max(i for i, k in enumerate(kinds) if k == "download")
