"""News back: a Standard Webhooks POST when a user batch ends (design.md, "News back").

Every ending is written as a `WebhookDelivery` by `record_endings`, in the very transaction
that ends the batch (progress.py is the one place batches end), so none is missed and none is
told twice. Delivery is apart from the cycles: the `webhook_sender` job (its own RQ queue,
scheduled every few seconds and triggered when a batch ends) claims the deliveries that are due
and POSTs them a few at a time, each with a short timeout; a timeout or a non-2xx answer is
retried after WEBHOOK_RETRY_SCHEDULE (about 5 s, 5 min, 30 min, 2 h, 5 h, 10 h), then given up.
Each attempt is stored. A receiver that never answers costs one timeout per attempt, on the
sender's queue, never a cycle. A batch's own callback_url is checked again before each attempt and
reached only at a public address (targets.py); the operator's WEBHOOK_URL is trusted as set.
"""

import datetime
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from standardwebhooks import Webhook

from bouncer.logs import ids
from bouncer.names import USER_AGENT
from bouncer.news import targets
from bouncer.states import DeliveryState
from bouncer.store.database import utcnow, write_transaction
from bouncer.store.models import UserBatch, WebhookAttempt, WebhookDelivery

log = logging.getLogger(__name__)


LEASE = 90                   # an attempt whose sender died is tried again after this (> WEBHOOK_TIMEOUT)
SENDER_BUDGET = 60           # seconds one sender run delivers before it leaves the rest


SENDER_THREADS = 8           # deliveries under way at once
CLAIM_LIMIT = 50


MAX_ERROR = 300


def target_of(delivery, settings):
    """(URL, whether it is the batch's own callback_url): the batch's callback_url, else
    WEBHOOK_URL, else (None, False)."""
    batch = UserBatch.get_or_none(UserBatch.id == delivery.batch_id)
    if batch is not None and batch.callback_url:
        return batch.callback_url, True
    return settings.webhook_url, False


def has_due(now=None):
    return (WebhookDelivery.select().where((WebhookDelivery.state == DeliveryState.PENDING)
                                           & (WebhookDelivery.next_attempt_at <= (now or utcnow())))
            .exists())


def send_due(settings, session=None, now=None):
    """Deliver what is due, a few at a time, until nothing is due or the budget is spent.
    Returns {state: deliveries that reached it}."""

    sessions = Sessions(settings, session)
    deadline = time.monotonic() + SENDER_BUDGET
    done = {}
    with ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix="webhook") as pool:
        while time.monotonic() < deadline:
            claimed = claim_due(now)
            if not claimed:
                break
            for state in pool.map(lambda d: attempt(d, settings, sessions), claimed):
                done[state] = done.get(state, 0) + 1
    return done


def claim_due(now=None):
    """Due deliveries nobody else is attempting, leased to this sender."""
    now = now or utcnow()
    with write_transaction():
        due = [d for (d,) in WebhookDelivery.select(WebhookDelivery.id).where(
            (WebhookDelivery.state == DeliveryState.PENDING) & (WebhookDelivery.next_attempt_at <= now)
            & (WebhookDelivery.lease_until.is_null() | (WebhookDelivery.lease_until < now)))
            .order_by(WebhookDelivery.next_attempt_at).limit(CLAIM_LIMIT).tuples()]
        if due:
            (WebhookDelivery.update(lease_until=now + datetime.timedelta(seconds=LEASE))
             .where(WebhookDelivery.id.in_(due)).execute())
    return list(WebhookDelivery.select().where(WebhookDelivery.id.in_(due))) if due else []


class Sessions:
    """The sender's HTTP sessions: one for WEBHOOK_URL (the operator's, trusted), one that reaches
    public addresses only for the batches' own callback_urls (unless WEBHOOK_ALLOW_PRIVATE)."""

    def __init__(self, settings, session=None):
        self.trusted = session or requests.Session()
        self.callbacks = self.trusted if settings.webhook_allow_private else targets.public_only_session()

    def for_target(self, own):
        return self.callbacks if own else self.trusted


def attempt(delivery, settings, sessions):
    """One attempt of one delivery: POST, record, and decide what comes next. Returns the
    delivery's state after it."""
    url, own = target_of(delivery, settings)
    now = utcnow()
    if url is None or not settings.webhook_secret:
        return finish(delivery, DeliveryState.NO_TARGET, now, error="no callback_url, no WEBHOOK_URL" if url is None
                      else "WEBHOOK_SECRET is not set")
    if own and not settings.webhook_allow_private:
        refused = refusal(delivery, url, now)
        if refused is not None:
            return refused
    started = time.monotonic()
    status, error = post(sessions.for_target(own), url, delivery, settings.webhook_secret, settings.webhook_timeout)
    seconds = time.monotonic() - started
    with write_transaction():
        WebhookAttempt.create(delivery_id=delivery.id, attempted_at=now, status_code=status,
                              error=error, seconds=round(seconds, 3))
    attempts = delivery.attempts + 1
    if status is not None and 200 <= status < 300:
        return finish(delivery, DeliveryState.DELIVERED, utcnow(), attempts=attempts, status=status, url=url)
    schedule = settings.webhook_retry_schedule
    if attempts > len(schedule):
        log.warning("Webhook %s for user batch %s given up after %d attempts: %s", delivery.message_id,
                    delivery.batch_id, attempts, error or "HTTP %s" % status,
                    extra=ids(user_batch_id=delivery.batch_id))
        return finish(delivery, DeliveryState.GIVEN_UP, utcnow(), attempts=attempts, status=status, error=error,
                      url=url)
    later = utcnow() + datetime.timedelta(seconds=schedule[attempts - 1])
    with write_transaction():
        (WebhookDelivery.update(attempts=attempts, next_attempt_at=later, lease_until=None, last_status=status,
                                last_error=error, url=url)
         .where(WebhookDelivery.id == delivery.id).execute())
    log.info("Webhook %s for user batch %s: attempt %d failed (%s); next in %ss", delivery.message_id,
             delivery.batch_id, attempts, error or "HTTP %s" % status, schedule[attempts - 1],
             extra=ids(user_batch_id=delivery.batch_id))
    return DeliveryState.PENDING


def refusal(delivery, url, now):
    """The callback_url checked again before it is reached (a name may resolve elsewhere since
    the submit): one that now resolves to an address it may not reach is given up at once,
    nothing sent. None when it may be tried."""
    try:
        targets.check_public(url)
    except targets.Unresolvable:
        return None      # a lookup failing now is the attempt's failure, retried as any other
    except targets.Refused as exc:
        log.warning("Webhook %s for user batch %s given up: its callback_url is refused: %s", delivery.message_id,
                    delivery.batch_id, exc, extra=ids(user_batch_id=delivery.batch_id))
        return finish(delivery, DeliveryState.GIVEN_UP, now, attempts=delivery.attempts,
                      error="refused, nothing sent: %s" % exc, url=url)
    return None


def finish(delivery, state, now, attempts=None, status=None, error=None, url=None):
    with write_transaction():
        (WebhookDelivery.update(state=state, finished_at=now, lease_until=None,
                                attempts=delivery.attempts if attempts is None else attempts,
                                last_status=status, last_error=error, url=url)
         .where(WebhookDelivery.id == delivery.id).execute())
    if state == DeliveryState.DELIVERED:
        log.info("Webhook %s for user batch %s delivered (HTTP %s)", delivery.message_id, delivery.batch_id,
                 status, extra=ids(user_batch_id=delivery.batch_id))
    return state


def post(session, url, delivery, secret, timeout):
    """(HTTP status or None, error or None) of one signed POST. Redirects are not followed: a
    receiver that moved says so, and the body never goes to a host it was not meant for."""
    timestamp = datetime.datetime.now(datetime.timezone.utc)
    signature = Webhook(secret).sign(delivery.message_id, timestamp, delivery.payload)
    headers = {"content-type": "application/json", "webhook-id": delivery.message_id,
               "webhook-timestamp": str(int(timestamp.timestamp())), "webhook-signature": signature,
               "user-agent": USER_AGENT}
    try:
        response = session.post(url, data=delivery.payload.encode("utf-8"), headers=headers,
                                timeout=(min(5, timeout), timeout), allow_redirects=False)
    except requests.Timeout:
        return None, "no answer within %ss" % timeout
    except requests.ConnectionError as exc:
        if targets.refused_connection(exc):
            return None, "refused, nothing sent: %s" % targets.RULE
        return None, ("%s: %s" % (type(exc).__name__, exc))[:MAX_ERROR]
    except requests.RequestException as exc:
        return None, ("%s: %s" % (type(exc).__name__, exc))[:MAX_ERROR]
    if 300 <= response.status_code < 400:
        return response.status_code, "redirected (not followed)"
    return response.status_code, None if response.ok else "HTTP %d" % response.status_code

