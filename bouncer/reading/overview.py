"""The queue at a glance, the one answer behind `status`, the console and /metrics: per check
type, rows and Bouncer batches in their states, credits spent (refunded by finishes, spent on
re-checks of greylisted addresses), the request budget in use, possible orphans, the policy the
line is ordered by and the users sharing it (the top ones by rows in line, the rest summed);
user batches and webhook deliveries by state; RQ's backlog.

The totals (credits spent and refunded, emails verified, Bouncer batches ended, possible orphans)
are read from the ledger, whose rows are never removed once sent: they never go down, so /metrics
may call them counters.
"""

import datetime

from peewee import Case, fn

from bouncer.names import CHECK_TYPES, CYCLE_QUEUE, WEBHOOK_QUEUE
from bouncer.queue import line
from bouncer.queue.fairness import line_policy, weights_of
from bouncer.queue.ledger import count_finishing, count_in_flight, count_outstanding, count_possible_orphans
from bouncer.queue.outcomes import iso
from bouncer.queue.ratelimit import requests_in_window
from bouncer.states import BatchState, BouncerBatchState, DeliveryState
from bouncer.store.database import utcnow
from bouncer.store.models import (
    BouncerBatch, QueuedEmail, RidingRows, SentShare, UserBatch, UserBatchEmail, WebhookDelivery,
)

Row = UserBatchEmail
# Ledger states of a Bouncer batch that Bouncer accepted (and charged for), and that ended.
CHARGED_STATES = (BouncerBatchState.OUTSTANDING, BouncerBatchState.COMPLETED, BouncerBatchState.FAILED)
ENDED_STATES = (BouncerBatchState.COMPLETED, BouncerBatchState.FAILED, BouncerBatchState.REJECTED,
                BouncerBatchState.ABANDONED)
# Users shown one by one (the console, /metrics' labels); the others are summed, so a million
# users never make a million series.
TOP_USERS = 20
SHARE_WINDOW = datetime.timedelta(hours=1)


def queue_overview(settings, now=None):
    """Per check type: emails waiting to be admitted, queued and in flight, Bouncer batches in
    flight against the cap, credits spent (today, UTC, and ever), emails verified, Bouncer
    batches ended by how; the request budget in use; possible orphans; user batches and webhook
    deliveries by state."""
    now = now or utcnow()
    in_line = {check_type: (n, rechecking or 0) for check_type, n, rechecking in QueuedEmail.select(
        QueuedEmail.check_type, fn.COUNT(QueuedEmail.row), fn.SUM(Case(None, ((QueuedEmail.rechecks > 0, 1),), 0)))
        .group_by(QueuedEmail.check_type).tuples()}
    riding = dict(RidingRows.select(BouncerBatch.check_type, fn.SUM(RidingRows.rows)).join(BouncerBatch)
                  .group_by(BouncerBatch.check_type).tuples())
    new = dict(Row.select(UserBatch.check_type, fn.COUNT(Row.id)).join(UserBatch)
               .where(line.not_admitted()).group_by(UserBatch.check_type).tuples())
    ledger = ledger_totals(start_of_day(now))
    return {
        "check_types": {
            check_type: {
                "new_emails": new.get(check_type, 0),
                "queued_emails": in_line.get(check_type, (0, 0))[0],
                "rechecking_emails": int(in_line.get(check_type, (0, 0))[1]),
                "sent_emails": riding.get(check_type, 0),
                "outstanding_batches": count_outstanding(check_type),
                "finishing_batches": count_finishing(check_type),
                "in_flight_batches": count_in_flight(check_type),
                "max_outstanding": settings.max_outstanding,
                **ledger[check_type],
                **users_sharing(check_type, now),
            } for check_type in CHECK_TYPES},
        "rate_limit": {
            "requests_last_60s": requests_in_window(now),
            "buffer": settings.rate_limit_buffer,
            "bouncer_limit": settings.rate_limit_per_minute,
        },
        "possible_orphans": count_possible_orphans(),
        "user_batch_counts": count_user_batches(),
        "webhook_deliveries": count_deliveries(),
        "outstanding": [
            {"id": b.id, "check_type": b.check_type, "bouncer_id": b.bouncer_id,
             "addresses": b.quantity, "bouncer_status": b.bouncer_status, "sent_at": iso(b.sent_at)}
            for b in BouncerBatch.select().where(BouncerBatch.status == "outstanding")
            .order_by(BouncerBatch.id)],
    }


def users_sharing(check_type, now):
    """The policy the line of `check_type` is ordered by, and its users: the TOP_USERS with the
    most rows in line (then the most addresses sent in the last hour), each with its weight,
    rows in line, addresses sent in the last hour and its share of them; the others summed."""
    queued = dict(QueuedEmail.select(QueuedEmail.user_id, fn.COUNT(QueuedEmail.row))
                  .where(QueuedEmail.check_type == check_type).group_by(QueuedEmail.user_id).tuples())
    sent = sent_per_user(check_type, now - SHARE_WINDOW)
    everyone = sorted(set(queued) | set(sent), key=lambda u: (-queued.get(u, 0), -sent.get(u, 0), u))
    top, rest = everyone[:TOP_USERS], everyone[TOP_USERS:]
    weights, total_sent = weights_of(top), sum(sent.values())
    return {"queue_policy": line_policy(check_type),
            "users": [{"user_id": u, "weight": weights[u], "queued_emails": queued.get(u, 0),
                       "sent_last_hour": sent.get(u, 0), "share_last_hour": share(sent.get(u, 0), total_sent)}
                      for u in top],
            "other_users": {"users": len(rest), "queued_emails": sum(queued.get(u, 0) for u in rest),
                            "sent_last_hour": sum(sent.get(u, 0) for u in rest),
                            "share_last_hour": share(sum(sent.get(u, 0) for u in rest), total_sent)}}


def sent_per_user(check_type, since):
    """{user id: new addresses its rows put into Bouncer batches Bouncer accepted since `since`}."""
    query = (SentShare.select(SentShare.user_id, fn.SUM(SentShare.addresses)).join(BouncerBatch)
             .where((SentShare.check_type == check_type) & (SentShare.reserved_at > since)
                    & BouncerBatch.status.in_(CHARGED_STATES))
             .group_by(SentShare.user_id))
    return {user_id: int(n) for user_id, n in query.tuples()}


def share(part, whole):
    return round(part / whole, 4) if whole else 0.0


def start_of_day(now):
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def ledger_totals(today):
    """{check type: credits spent since `today` and ever, refunded by finishes and spent on
    re-checks (ever), emails verified, possible orphans, Bouncer batches ended by state}, in one
    pass over the ledger. A credit is an address of a Bouncer batch that Bouncer accepted (held
    when it is created); a finish gives back what Bouncer had not verified; a verified email is
    an address of a batch that completed, less what a finish refunded."""
    charged = BouncerBatch.status.in_(CHARGED_STATES)
    query = (BouncerBatch.select(
        BouncerBatch.check_type, BouncerBatch.status, fn.COUNT(BouncerBatch.id), fn.SUM(BouncerBatch.quantity),
        fn.SUM(Case(None, ((charged & (BouncerBatch.sent_at >= today), BouncerBatch.quantity),), 0)),
        fn.SUM(fn.COALESCE(BouncerBatch.refunded, 0)), fn.SUM(BouncerBatch.rechecks))
        .group_by(BouncerBatch.check_type, BouncerBatch.status))
    totals = {check_type: {"credits_spent_today": 0, "credits_spent_total": 0, "credits_refunded_total": 0,
                           "credits_rechecks_total": 0, "emails_verified_total": 0,
                           "possible_orphans": 0, "batches_ended": dict.fromkeys(ENDED_STATES, 0)}
              for check_type in CHECK_TYPES}
    for check_type, status, batches, addresses, today_addresses, refunded, rechecks in query.tuples():
        if check_type not in totals:
            continue
        t = totals[check_type]
        if status in CHARGED_STATES:
            t["credits_spent_total"] += addresses or 0
            t["credits_spent_today"] += today_addresses or 0
            t["credits_refunded_total"] += refunded or 0
            t["credits_rechecks_total"] += rechecks or 0
        if status == BouncerBatchState.COMPLETED:
            t["emails_verified_total"] = (addresses or 0) - (refunded or 0)
        if status == BouncerBatchState.ABANDONED:
            t["possible_orphans"] = batches
        if status in ENDED_STATES:
            t["batches_ended"][status] = batches
    return totals


def count_user_batches():
    """{status: user batches}, every status named."""
    found = dict(UserBatch.select(UserBatch.status, fn.COUNT(UserBatch.id)).group_by(UserBatch.status).tuples())
    return {status: found.get(status, 0) for status in BatchState}


def count_deliveries():
    """{state: webhook deliveries}, every state named."""
    found = dict(WebhookDelivery.select(WebhookDelivery.state, fn.COUNT(WebhookDelivery.id))
                 .group_by(WebhookDelivery.state).tuples())
    return {state: found.get(state, 0) for state in DeliveryState}


def rq_backlog(redis):
    """Jobs waiting on each RQ queue of the service, and the workers alive (from Redis)."""
    from rq import Queue, Worker

    return {"queues": {name: Queue(name, connection=redis).count for name in (CYCLE_QUEUE, WEBHOOK_QUEUE)},
            "workers": Worker.count(connection=redis)}

