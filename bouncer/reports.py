"""Reading what the queue did: the one reporting layer behind `status`, the HTTP API, the
console and /metrics, so that they never disagree.

- `batch_status(id)`: the status object of one user batch (design.md, "Status object");
- `iter_results(id)`: its rows in position order, read from the view `user_batch_results`,
  which is also what a host reads with plain SQL;
- `queue_overview(settings)`: per check type, emails and Bouncer batches in their states, the
  request budget, credits spent, possible orphans; user batches and webhook deliveries by state;
- the console's lists: a page of user batches, one batch's rows, Bouncer batches and webhook
  deliveries, the ledger, recent failures.

The totals (credits spent, emails verified, Bouncer batches ended, possible orphans) are read
from the ledger, whose rows are never removed once sent: they never go down, whatever the
service prunes, so /metrics may call them counters.
"""
import datetime
import io
from urllib.parse import urlsplit

from peewee import JOIN, Case, fn

from . import progress
from .config import CHECK_TYPES
from .db import among, database, utcnow
from .errors import NotFound
from .ledger import count_in_flight, count_outstanding, count_possible_orphans
from .models import (
    ABANDONED, BATCH_FAILED, BATCH_STATES, CANCELLED, COMPLETED, DELIVERED, DONE, FAILED, GIVEN_UP,
    IN_FLIGHT_STATES, INVALID, NO_TARGET, OUTSTANDING, PENDING, QUEUED, REJECTED, ROW_STATES, SENT, VERDICTS,
    BouncerBatch, QueuedEmail, RidingRows, UserBatch, UserBatchEmail, WebhookAttempt, WebhookDelivery,
    result_model,
)
from .ratelimit import requests_in_window

COUNT_KEYS = VERDICTS + (INVALID, FAILED, CANCELLED, "pending")
# Ledger states of a Bouncer batch that Bouncer accepted (and charged for), and that ended.
CHARGED_STATES = (OUTSTANDING, COMPLETED, FAILED)
ENDED_STATES = (COMPLETED, FAILED, REJECTED, ABANDONED)
DELIVERY_STATES = (PENDING, DELIVERED, GIVEN_UP, NO_TARGET)
RESULT_COLUMNS = ("email", "status", "reason", "score", "accept_all", "disposable", "free", "role",
                  "disabled", "full_mailbox", "provider")
EXPORT_PAGE = 10000
Row = UserBatchEmail


def iso(moment):
    return moment.isoformat() + "Z" if moment else None


def get_user_batch(batch_id):
    batch = UserBatch.get_or_none(UserBatch.id == batch_id)
    if batch is None:
        raise NotFound("no user batch with id %s" % batch_id)
    return batch


def batch_status(batch_id):
    """The contract's status object for one user batch, with its latest webhook delivery."""
    from .webhooks import delivery_of
    answer = status_object(get_user_batch(batch_id))
    answer["webhook"] = delivery_of(batch_id)
    return answer


def status_object(batch, counts=None):
    counts = counts if counts is not None else count_outcomes(batch)
    total = sum(counts.values())
    return {
        "batch_id": batch.id, "user_id": batch.user_id, "check_type": batch.check_type,
        "status": batch.status, "total": total, "done": total - counts["pending"], "counts": counts,
        "created_at": iso(batch.created_at), "completed_at": iso(batch.completed_at),
        "failure_reason": batch.failure_reason,
    }


def count_outcomes(batch):
    """{outcome: rows} of one batch: each verdict, invalid, failed, cancelled and pending."""
    return count_outcomes_of([batch])[batch.id]


def count_outcomes_of(batches):
    """{batch id: {outcome: rows}} of several batches, one query per check type."""
    counts = {b.id: dict.fromkeys(COUNT_KEYS, 0) for b in batches}
    for check_type in {b.check_type for b in batches}:
        Result = result_model(check_type)
        query = (Row.select(Row.batch, Row.status, Result.status, fn.COUNT(Row.id))
                 .join(Result, JOIN.LEFT_OUTER, on=(
                     (Result.email_global == Row.email_global) & (Row.status == DONE)))
                 .where(among(Row.batch, [b.id for b in batches if b.check_type == check_type]))
                 .group_by(Row.batch, Row.status, Result.status))
        for batch_id, row_status, verdict, n in query.tuples():
            counts[batch_id][outcome(row_status, verdict)] += n
    return counts


def outcome(row_status, verdict):
    if row_status == DONE:
        return verdict if verdict in VERDICTS else "unknown"
    if row_status in (INVALID, FAILED, CANCELLED):
        return row_status
    return "pending"


def recent_batches(limit=20, user_id=None, status=None, before=None):
    """The latest user batches with their progress, newest first (`before`: ids below it)."""
    batches = list(select_batches(limit, user_id, status, before))
    pending = pending_counts(batches)
    return [{"batch_id": b.id, "user_id": b.user_id, "check_type": b.check_type, "status": b.status,
             "total": b.total, "done": b.total - pending.get(b.id, 0),
             "created_at": iso(b.created_at)} for b in batches]


def select_batches(limit, user_id=None, status=None, before=None):
    query = UserBatch.select().order_by(UserBatch.id.desc()).limit(limit)
    if user_id is not None:
        query = query.where(UserBatch.user_id == user_id)
    if status is not None:
        query = query.where(UserBatch.status == status)
    if before is not None:
        query = query.where(UserBatch.id < before)
    return query


def page_of_batches(limit=20, user_id=None, status=None, before=None):
    """(status objects of the latest user batches, newest first; the `before` of the next page,
    or None when there is none)."""
    batches = list(select_batches(limit + 1, user_id, status, before))
    shown = batches[:limit]
    counts = count_outcomes_of(shown)
    return [status_object(b, counts[b.id]) for b in shown], shown[-1].id if len(batches) > limit else None


def pending_counts(batches):
    """{batch id: rows admitted and not yet final}: those in line and those riding, each counted
    through its own index (no index of the rows holds their status)."""
    found = {}
    if not batches:
        return found
    riding = (RidingRows.select(RidingRows.batch_id, fn.SUM(RidingRows.rows))
              .where(RidingRows.batch_id.in_([b.id for b in batches])).group_by(RidingRows.batch_id))
    for check_type in {b.check_type for b in batches}:
        placed = [b for b in batches if b.check_type == check_type and b.fifo_order is not None]
        if placed:
            waiting = (QueuedEmail.select(QueuedEmail.batch_id, fn.COUNT(QueuedEmail.row))
                       .where((QueuedEmail.check_type == check_type)
                              & QueuedEmail.fifo_order.in_([b.fifo_order for b in placed])
                              & QueuedEmail.batch_id.in_([b.id for b in placed]))
                       .group_by(QueuedEmail.batch_id))
            found.update(waiting.tuples())
    for batch_id, rows in riding.tuples():
        found[batch_id] = found.get(batch_id, 0) + int(rows)
    return found


def queue_overview(settings, now=None):
    """Per check type: emails waiting to be admitted, queued and in flight, Bouncer batches in
    flight against the cap, credits spent (today, UTC, and ever), emails verified, Bouncer
    batches ended by how; the request budget in use; possible orphans; user batches and webhook
    deliveries by state."""
    now = now or utcnow()
    waiting = dict(QueuedEmail.select(QueuedEmail.check_type, fn.COUNT(QueuedEmail.row))
                   .group_by(QueuedEmail.check_type).tuples())
    riding = dict(RidingRows.select(BouncerBatch.check_type, fn.SUM(RidingRows.rows)).join(BouncerBatch)
                  .group_by(BouncerBatch.check_type).tuples())
    new = dict(Row.select(UserBatch.check_type, fn.COUNT(Row.id)).join(UserBatch)
               .where(progress.not_admitted()).group_by(UserBatch.check_type).tuples())
    ledger = ledger_totals(start_of_day(now))
    return {
        "check_types": {
            check_type: {
                "new_emails": new.get(check_type, 0),
                "queued_emails": waiting.get(check_type, 0),
                "sent_emails": riding.get(check_type, 0),
                "outstanding_batches": count_outstanding(check_type),
                "in_flight_batches": count_in_flight(check_type),
                "max_outstanding": settings.max_outstanding,
                **ledger[check_type],
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


def start_of_day(now):
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def ledger_totals(today):
    """{check type: credits spent since `today` and ever, emails verified, possible orphans,
    Bouncer batches ended by state}, in one pass over the ledger. A credit is an address of a
    Bouncer batch that Bouncer accepted; a verified email, an address of one that completed."""
    charged = BouncerBatch.status.in_(CHARGED_STATES)
    query = (BouncerBatch.select(
        BouncerBatch.check_type, BouncerBatch.status, fn.COUNT(BouncerBatch.id), fn.SUM(BouncerBatch.quantity),
        fn.SUM(Case(None, ((charged & (BouncerBatch.sent_at >= today), BouncerBatch.quantity),), 0)))
        .group_by(BouncerBatch.check_type, BouncerBatch.status))
    totals = {check_type: {"credits_spent_today": 0, "credits_spent_total": 0, "emails_verified_total": 0,
                           "possible_orphans": 0, "batches_ended": dict.fromkeys(ENDED_STATES, 0)}
              for check_type in CHECK_TYPES}
    for check_type, status, batches, addresses, today_addresses in query.tuples():
        if check_type not in totals:
            continue
        t = totals[check_type]
        if status in CHARGED_STATES:
            t["credits_spent_total"] += addresses or 0
            t["credits_spent_today"] += today_addresses or 0
        if status == COMPLETED:
            t["emails_verified_total"] = addresses or 0
        if status == ABANDONED:
            t["possible_orphans"] = batches
        if status in ENDED_STATES:
            t["batches_ended"][status] = batches
    return totals


def count_user_batches():
    """{status: user batches}, every status named."""
    found = dict(UserBatch.select(UserBatch.status, fn.COUNT(UserBatch.id)).group_by(UserBatch.status).tuples())
    return {status: found.get(status, 0) for status in BATCH_STATES}


def count_deliveries():
    """{state: webhook deliveries}, every state named."""
    found = dict(WebhookDelivery.select(WebhookDelivery.state, fn.COUNT(WebhookDelivery.id))
                 .group_by(WebhookDelivery.state).tuples())
    return {state: found.get(state, 0) for state in DELIVERY_STATES}


def rq_backlog(redis):
    """Jobs waiting on each RQ queue of the service, and the workers alive (from Redis)."""
    from rq import Queue, Worker

    from .jobs import QUEUE_NAME, WEBHOOK_QUEUE
    return {"queues": {name: Queue(name, connection=redis).count for name in (QUEUE_NAME, WEBHOOK_QUEUE)},
            "workers": Worker.count(connection=redis)}


# -- the console's lists --

def row_states(batch_id):
    """{row state: rows} of one user batch, every state named: `queued` in line, `sent` riding
    on a Bouncer batch."""
    found = dict(Row.select(Row.status, fn.COUNT(Row.id)).where(Row.batch == batch_id)
                 .group_by(Row.status).tuples())
    found[SENT] = (RidingRows.select(fn.COALESCE(fn.SUM(RidingRows.rows), 0))
                   .where(RidingRows.batch_id == batch_id).scalar())
    found[QUEUED] = found.get(QUEUED, 0) - found[SENT]
    return {state: found.get(state, 0) for state in ROW_STATES}


def ledger_entry(b, now):
    """One Bouncer batch of the ledger, as the console shows it."""
    delay = None
    if b.finished_at and b.bouncer_completed_at and b.status == COMPLETED:
        delay = max(0.0, (b.finished_at - b.bouncer_completed_at).total_seconds())
    return {"id": b.id, "check_type": b.check_type, "status": b.status, "bouncer_id": b.bouncer_id,
            "addresses": b.quantity, "reserved_at": iso(b.reserved_at), "sent_at": iso(b.sent_at),
            "age_seconds": round((now - b.reserved_at).total_seconds()),
            "last_checked_at": iso(b.last_checked_at), "bouncer_status": b.bouncer_status,
            "finished_at": iso(b.finished_at), "failure_reason": b.failure_reason,
            "results_delay_seconds": round(delay, 1) if delay is not None else None}


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
            "next_attempt_at": iso(d.next_attempt_at) if d.state == PENDING else None,
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
    users = (UserBatch.select().where(UserBatch.status == BATCH_FAILED)
             .order_by(UserBatch.completed_at.desc(nulls="last"), UserBatch.id.desc()).limit(limit))
    bouncer = (BouncerBatch.select().where(BouncerBatch.status.in_((FAILED, REJECTED, ABANDONED)))
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


RESULTS_PAGE_SQL = (
    "SELECT position, email, status, reason, score, accept_all, disposable, free, role, disabled,"
    " full_mailbox, provider FROM user_batch_results WHERE batch_id = {p} AND position > {p}"
    " ORDER BY position LIMIT {p}")


def iter_results(batch_id):
    """One dict per submitted row, in position order, read a page at a time from the view."""
    get_user_batch(batch_id)
    sql = RESULTS_PAGE_SQL.format(p=database.param)
    after = 0
    while True:
        page = database.execute_sql(sql, (batch_id, after, EXPORT_PAGE)).fetchall()
        for row in page:
            yield dict(zip(RESULT_COLUMNS, row[1:]))
        if len(page) < EXPORT_PAGE:
            return
        after = page[-1][0]


def results_csv(rows, flush_at=64 * 1024):
    """The CSV of `results`, spreadsheet-safe, in pieces of about `flush_at` characters (the
    CLI writes them to a file, the API and the console stream them)."""
    import csv   # here: only an export writes CSV
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: spreadsheet_safe(v) for k, v in row.items()})
        if buffer.tell() > flush_at:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def spreadsheet_safe(value):
    """A cell a spreadsheet will not run as a formula (addresses may legally start with = + - @)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value

