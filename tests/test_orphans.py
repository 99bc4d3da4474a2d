"""A create that times out may have made a batch at Bouncer all the same. With the callback on,
its reservation waits for Bouncer's callback, which names it: the batch is then followed and its
emails are not paid for twice. Without one within RESERVATION_TIMEOUT, it is abandoned (a
possible orphan) and its emails are sent again, as before."""
import datetime

from conftest import addresses, statuses, submit, with_settings

from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.queue.ledger import count_possible_orphans
from bouncer.states import BouncerBatchState
from bouncer.store.database import utcnow
from bouncer.store.models import BouncerBatch
from bouncer.web import create_web_app

SECRET = "cb-secret-5e4d3c2b1a"


def callbacks_on(app):
    return with_settings(app, public_url="https://bouncer.example.com", callback_secret=SECRET)


def test_a_timed_out_create_is_followed_when_its_callback_names_it(app, bouncer):
    app = callbacks_on(app)
    batch = submit("alice", addresses("a", 10))
    bouncer.fail_next("timeout", kind="create")         # Bouncer makes the batch; we hear nothing
    report = run_cycle(app, CREATION, "deliverable")
    (reservation,) = BouncerBatch.select()
    assert len(report.failed_calls) == 1 and reservation.status == BouncerBatchState.RESERVED
    assert "waiting for Bouncer's callback" in reservation.failure_reason
    assert count_possible_orphans() == 0
    run_cycle(app, CREATION, "deliverable")              # not sent again meanwhile
    assert bouncer.count("create") == 1

    (bouncer_id,) = list(bouncer.batches)
    assert app.callback_url("deliverable", reservation=reservation.id) == (
        "https://bouncer.example.com/bouncer/callback/%s/deliverable?reservation=%d" % (SECRET, reservation.id))
    bouncer.complete_now()
    web = create_web_app(app).test_client()
    answer = web.post("/bouncer/callback/%s/deliverable?reservation=%d" % (SECRET, reservation.id),
                      json={"batchId": bouncer_id, "status": "completed"})
    assert answer.status_code == 202
    followed = BouncerBatch.get_by_id(reservation.id)
    assert (followed.status, followed.bouncer_id, followed.failure_reason) == (
        BouncerBatchState.OUTSTANDING, bouncer_id, None)
    run_cycle(app, STATUS, "deliverable")
    assert statuses(batch) == {"done": 10}
    assert sorted(bouncer.sent_addresses()) == sorted(addresses("a", 10))   # one credit each


def test_without_a_callback_the_reservation_is_abandoned_and_sent_again(app, bouncer):
    app = callbacks_on(app)
    submit("alice", addresses("a", 10))
    bouncer.fail_next("timeout", kind="create")
    run_cycle(app, CREATION, "deliverable")
    later = utcnow() + datetime.timedelta(seconds=app.settings.reservation_timeout + 1)
    run_cycle(app, CREATION, "deliverable", now=later)
    assert count_possible_orphans() == 1 and bouncer.count("create") == 2
    # Its callback comes after all: the orphan is known by its id, and nothing else changes.
    (orphan,) = BouncerBatch.select().where(BouncerBatch.status == BouncerBatchState.ABANDONED)
    first = next(iter(bouncer.batches))
    web = create_web_app(app).test_client()
    web.post("/bouncer/callback/%s/deliverable?reservation=%d" % (SECRET, orphan.id), json={"batchId": first})
    assert BouncerBatch.get_by_id(orphan.id).bouncer_id == first
    assert BouncerBatch.get_by_id(orphan.id).status == BouncerBatchState.ABANDONED


def test_a_callback_cannot_take_over_a_known_batch_or_a_followed_reservation(app, bouncer):
    app = callbacks_on(app)
    submit("alice", addresses("a", 10))
    run_cycle(app, CREATION, "deliverable")
    (sent,) = BouncerBatch.select()
    web = create_web_app(app).test_client()
    web.post("/bouncer/callback/%s/deliverable?reservation=%d" % (SECRET, sent.id), json={"batchId": "forged"})
    assert BouncerBatch.get_by_id(sent.id).bouncer_id == sent.bouncer_id


def test_without_the_callback_a_timed_out_create_is_a_possible_orphan_at_once(app, bouncer):
    submit("alice", addresses("a", 10))
    bouncer.fail_next("timeout", kind="create")
    run_cycle(app, CREATION, "deliverable")
    assert count_possible_orphans() == 1
