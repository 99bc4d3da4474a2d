"""What the console lists: the ledger of Bouncer batches, webhook deliveries with their attempts,
recent failures."""

import datetime
import logging
from urllib.parse import urlsplit

from peewee import fn

from bouncer.queue.outcomes import iso
from bouncer.states import IN_FLIGHT_STATES, BatchState, BouncerBatchState, DeliveryState
from bouncer.store.database import utcnow
from bouncer.store.models import BouncerBatch, RidingRows, UserBatch, UserBatchEmail, WebhookAttempt, WebhookDelivery

Row = UserBatchEmail

log = logging.getLogger(__name__)


def ledger_entry(b, now):
    """One Bouncer batch of the ledger, as the console shows it."""
    delay = None
    if b.finished_at and b.bouncer_completed_at and b.status == BouncerBatchState.COMPLETED:
        delay = max(0.0, (b.finished_at - b.bouncer_completed_at).total_seconds())
    return {"id": b.id, "check_type": b.check_type, "status": b.status, "bouncer_id": b.bouncer_id,
            "addresses": b.quantity, "reserved_at": iso(b.reserved_at), "sent_at": iso(b.sent_at),
            "age_seconds": round((now - b.reserved_at).total_seconds()),
            "last_checked_at": iso(b.last_checked_at), "bouncer_status": b.bouncer_status,
            "finished_at": iso(b.finished_at), "failure_reason": b.failure_reason,
            "results_delay_seconds": round(delay, 1) if delay is not None else None,
            "finish_reason": b.finish_reason, "finish_asked_at": iso(b.finish_asked_at),
            "finish_accepted_at": iso(b.finish_accepted_at), "credits": b.credits, "refunded": b.refunded,
            "rechecks": b.rechecks, "deleted_at": iso(b.deleted_at)}


def recent_bouncer_batches(ended=15, now=None):
    """The ledger as an operator reads it: every Bouncer batch in flight, then the `ended` that
    ended last; newest first."""
    now = now or utcnow()
    flying = BouncerBatch.select().where(BouncerBatch.status.in_(IN_FLIGHT_STATES)).order_by(BouncerBatch.id.desc())
    done = (BouncerBatch.select().where(BouncerBatch.status.not_in(IN_FLIGHT_STATES))
            .order_by(BouncerBatch.id.desc()).limit(ended))
    return [ledger_entry(b, now) for b in list(flying) + list(done)]


def bouncer_batches_of(batch_id, now=None):
    """The Bouncer batches the rows of one user batch ride or rode on (the last attempt of each
    row)."""
    now = now or utcnow()
    rode = Row.select(Row.bouncer_batch).distinct().where((Row.batch == batch_id) & Row.bouncer_batch.is_null(False))
    riding = RidingRows.select(RidingRows.bouncer_batch).distinct().where(RidingRows.batch_id == batch_id)
    return [ledger_entry(b, now) for b in BouncerBatch.select().where(
        BouncerBatch.id.in_(rode) | BouncerBatch.id.in_(riding)).order_by(BouncerBatch.id)]


def delivery_entry(d, attempts=None):
    return {"id": d.id, "batch_id": d.batch_id, "event": d.event, "state": d.state, "webhook_id": d.message_id,
            "target": shown_url(d.url), "attempts": d.attempts, "last_status": d.last_status,
            "last_error": d.last_error, "created_at": iso(d.created_at), "finished_at": iso(d.finished_at),
            "next_attempt_at": iso(d.next_attempt_at) if d.state == DeliveryState.PENDING else None,
            "tries": attempts or []}


def recent_deliveries(limit=20):
    """The latest webhook deliveries, newest first."""
    return [delivery_entry(d) for d in WebhookDelivery.select().order_by(WebhookDelivery.id.desc()).limit(limit)]


def deliveries_of(batch_id):
    """Every webhook delivery of one user batch with each of its attempts, oldest first."""
    deliveries = list(WebhookDelivery.select().where(WebhookDelivery.batch_id == batch_id)
                      .order_by(WebhookDelivery.id))
    tries = {d.id: [] for d in deliveries}
    if deliveries:
        for a in (WebhookAttempt.select().where(WebhookAttempt.delivery_id.in_(list(tries)))
                  .order_by(WebhookAttempt.id)):
            tries[a.delivery_id].append({"at": iso(a.attempted_at), "status": a.status_code, "error": a.error,
                                         "seconds": a.seconds})
    return [delivery_entry(d, tries[d.id]) for d in deliveries]


def recent_failures(limit=20, now=None):
    """Failed user batches and Bouncer batches that failed, were rejected or abandoned, newest
    first: {"at", "what", "id", "check_type", "status", "reason"}."""
    now = now or utcnow()
    users = (UserBatch.select().where(UserBatch.status == BatchState.FAILED)
             .order_by(UserBatch.completed_at.desc(nulls="last"), UserBatch.id.desc()).limit(limit))
    failed = (BouncerBatchState.FAILED, BouncerBatchState.REJECTED, BouncerBatchState.ABANDONED)
    bouncer = (BouncerBatch.select().where(BouncerBatch.status.in_(failed))
               .order_by(BouncerBatch.finished_at.desc(nulls="last"), BouncerBatch.id.desc()).limit(limit))
    failures = [{"at": b.completed_at, "what": "user batch", "id": b.id, "check_type": b.check_type,
                 "status": b.status, "reason": b.failure_reason} for b in users]
    failures += [{"at": b.finished_at, "what": "Bouncer batch", "id": b.id, "check_type": b.check_type,
                  "status": b.status, "reason": b.failure_reason} for b in bouncer]
    failures.sort(key=lambda f: f["at"] or datetime.datetime.min, reverse=True)
    return [dict(f, at=iso(f["at"])) for f in failures[:limit]]


def shown_url(url):
    """A webhook target fit to show: scheme, host and path (a query may carry the receiver's token)."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        port = ":%d" % parts.port if parts.port else ""
        return "%s://%s%s%s" % (parts.scheme, parts.hostname or "", port, parts.path)
    except ValueError:
        return "(malformed URL)"


def delivery_of(batch_id):
    """The latest delivery for a user batch, as the status views show it; None if it has none."""
    return deliveries_of_batches([batch_id]).get(batch_id)


def deliveries_of_batches(batch_ids):
    """{user batch id: its latest delivery, as the status views show it}, in one query."""
    if not batch_ids:
        return {}
    latest = (WebhookDelivery.select(fn.MAX(WebhookDelivery.id))
              .where(WebhookDelivery.batch_id.in_(batch_ids)).group_by(WebhookDelivery.batch_id))
    return {d.batch_id: shown_delivery(d) for d in WebhookDelivery.select().where(WebhookDelivery.id.in_(latest))}


def shown_delivery(delivery):
    return {"event": delivery.event, "state": delivery.state, "attempts": delivery.attempts,
            "last_status": delivery.last_status, "last_error": delivery.last_error,
            "next_attempt_at": (delivery.next_attempt_at.isoformat() + "Z"
                                if delivery.state == DeliveryState.PENDING else None),
            "webhook_id": delivery.message_id}
