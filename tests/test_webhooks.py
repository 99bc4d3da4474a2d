"""News back: every ending of a user batch is told once, by a Standard Webhooks signed POST,
retried with the schedule, stored attempt by attempt, and given up after the last one
(invariant 11). The receivers are real HTTP servers on loopback, verifying with the
`standardwebhooks` library."""
import datetime
import time

import pytest
from conftest import addresses, with_settings

from bouncer.cycles.runner import run_cycle
from bouncer.doors.admission import admit
from bouncer.doors.loading import create_user_batch
from bouncer.names import CREATION, STATUS
from bouncer.news import webhooks
from bouncer.queue import progress
from bouncer.reading.batches import batch_status
from bouncer.states import DeliveryState
from bouncer.store.database import utcnow
from bouncer.store.models import (
    DeliverableResult, EmailGlobal, UserBatch, UserBatchEmail, WebhookAttempt, WebhookDelivery,
)
from support.receiver import Receiver

SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaA=="


@pytest.fixture
def hooks_app(app):
    # A compressed schedule: three retries a fraction of a second apart. The receivers are on
    # loopback, which a callback_url may name only with WEBHOOK_ALLOW_PRIVATE.
    return with_settings(app, webhook_secret=SECRET, webhook_retry_schedule=(1, 1, 1), webhook_allow_private=True)


def deliveries(batch_id=None):
    query = WebhookDelivery.select().order_by(WebhookDelivery.id)
    if batch_id is not None:
        query = query.where(WebhookDelivery.batch_id == batch_id)
    return list(query)


def send_until_settled(settings, rounds=8):
    """The sender's runs, each after the next attempt fell due."""
    for _ in range(rounds):
        webhooks.send_due(settings)
        if not WebhookDelivery.select().where(WebhookDelivery.state == DeliveryState.PENDING).exists():
            return
        time.sleep(1.05)
    raise AssertionError("deliveries still pending")


def run_to_the_end(app, bouncer):
    for _ in range(3):
        run_cycle(app, CREATION, "deliverable")
        bouncer.complete_now()
        run_cycle(app, STATUS, "deliverable")


def test_completed_batch_is_told_signed_and_verified(hooks_app, bouncer):
    with Receiver(SECRET) as hooks:
        batch = create_user_batch("alice", "deliverable", addresses("a", 3), callback_url=hooks.url).batch_id
        run_to_the_end(hooks_app, bouncer)
        assert webhooks.send_due(hooks_app.settings) == {DeliveryState.DELIVERED: 1}
    (payload,) = hooks.verified()
    assert payload["type"] == "batch.completed" and payload["timestamp"].endswith("Z")
    assert payload["data"]["batch_id"] == batch and payload["data"]["status"] == "completed"
    assert payload["data"]["counts"] == batch_status(batch)["counts"]
    delivery = deliveries(batch)[0]
    assert hooks.received[0]["headers"]["webhook-id"] == delivery.message_id
    assert (delivery.state, delivery.attempts, delivery.last_status) == (DeliveryState.DELIVERED, 1, 200)
    assert batch_status(batch)["webhook"]["state"] == DeliveryState.DELIVERED


def test_a_failed_attempt_is_retried_with_the_same_webhook_id(hooks_app, bouncer):
    with Receiver(SECRET, answers=[500, 200]) as hooks:
        create_user_batch("alice", "deliverable", addresses("a", 2), callback_url=hooks.url)
        run_to_the_end(hooks_app, bouncer)
        send_until_settled(hooks_app.settings)
    assert len(hooks.received) == 2 and len(hooks.verified()) == 2
    assert hooks.received[0]["headers"]["webhook-id"] == hooks.received[1]["headers"]["webhook-id"]
    attempts = list(WebhookAttempt.select().order_by(WebhookAttempt.id))
    assert [a.status_code for a in attempts] == [500, 200]
    assert deliveries()[0].state == DeliveryState.DELIVERED


def test_a_receiver_that_never_answers_is_given_up_after_the_last_retry(hooks_app, bouncer):
    hooks_app = with_settings(hooks_app, webhook_timeout=1)
    with Receiver(SECRET, hang=True) as hooks:
        batch = create_user_batch("alice", "deliverable", addresses("a", 2), callback_url=hooks.url).batch_id
        run_to_the_end(hooks_app, bouncer)
        send_until_settled(hooks_app.settings)
    delivery = deliveries(batch)[0]
    assert (delivery.state, delivery.attempts) == (DeliveryState.GIVEN_UP, 4)     # the first and three retries
    assert all(a.error == "no answer within 1s" for a in WebhookAttempt.select())
    assert len(hooks.received) == 4


def test_a_redirect_is_not_followed(hooks_app, bouncer):
    with Receiver(SECRET, answers=[302]) as hooks:
        create_user_batch("alice", "deliverable", addresses("a", 1), callback_url=hooks.url)
        run_to_the_end(hooks_app, bouncer)
        webhooks.send_due(hooks_app.settings)
    attempt = WebhookAttempt.get()
    assert attempt.status_code == 302 and "not followed" in attempt.error
    assert deliveries()[0].state == DeliveryState.PENDING


def test_webhook_url_is_the_default_target_and_none_is_no_target(hooks_app, bouncer):
    with Receiver(SECRET) as hooks:
        app = with_settings(hooks_app, webhook_url=hooks.url)
        create_user_batch("alice", "deliverable", addresses("a", 1))
        run_to_the_end(app, bouncer)
        assert webhooks.send_due(app.settings) == {DeliveryState.DELIVERED: 1}
    create_user_batch("bob", "deliverable", addresses("b", 1))
    run_to_the_end(hooks_app, bouncer)
    assert webhooks.send_due(hooks_app.settings) == {DeliveryState.NO_TARGET: 1}


def test_every_way_a_batch_ends_is_told_once(hooks_app, bouncer):
    """Ingest, cached verdicts, a failed Bouncer batch, a cancel, and a host batch with no
    valid row: each ending has exactly one delivery, of the right kind."""
    ingested = create_user_batch("a", "deliverable", ["one@example.com"]).batch_id
    run_to_the_end(hooks_app, bouncer)
    gid = EmailGlobal.get(EmailGlobal.email == "one@example.com").id
    assert DeliverableResult.get_or_none(DeliverableResult.email_global == gid) is not None
    cached = create_user_batch("b", "deliverable", ["one@example.com"]).batch_id
    run_cycle(hooks_app, CREATION, "deliverable")       # completed from the cached verdict
    lost = create_user_batch("c", "deliverable", ["lost@example.com"]).batch_id
    run_cycle(hooks_app, CREATION, "deliverable")
    for batch_id in list(bouncer.batches):
        bouncer.forget(batch_id)
    run_cycle(hooks_app, STATUS, "deliverable")          # 404: failed
    cancelled = create_user_batch("d", "deliverable", ["x@example.com"]).batch_id
    progress.cancel_batch(cancelled)
    host = UserBatch.create(user_id="e", check_type="deliverable", status="new")
    UserBatchEmail.create(batch=host.id, position=1, email="not an address", status="new")
    admit("deliverable")
    for _ in range(2):                                    # nothing ends twice
        run_to_the_end(hooks_app, bouncer)
    told = [(d.batch_id, d.event) for d in deliveries()]
    assert sorted(told) == sorted([(ingested, "batch.completed"), (cached, "batch.completed"),
                                   (lost, "batch.failed"), (cancelled, "batch.cancelled"),
                                   (host.id, "batch.failed")])


def test_a_dead_sender_is_replaced_after_its_lease(hooks_app, bouncer):
    with Receiver(SECRET) as hooks:
        create_user_batch("alice", "deliverable", addresses("a", 1), callback_url=hooks.url)
        run_to_the_end(hooks_app, bouncer)
        (claimed,) = webhooks.claim_due()               # a sender took it, then died
        assert webhooks.claim_due() == []
        later = utcnow() + datetime.timedelta(seconds=webhooks.LEASE + 1)
        assert [d.id for d in webhooks.claim_due(now=later)] == [claimed.id]
