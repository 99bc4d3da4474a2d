"""Reading what the queue did: the one reporting layer behind `status`, the HTTP API, the
console and /metrics, so that they never disagree.

- `batch_status(id)`: the status object of one user batch (design.md, "Status object");
- `iter_results(id)`: its rows in position order, read from the view `user_batch_results`,
  which is also what a host reads with plain SQL;
- `queue_overview(settings)`: per check type, emails and Bouncer batches in their states, the
  request budget, possible orphans.
"""
from peewee import JOIN, fn

from .config import CHECK_TYPES
from .db import database
from .errors import NotFound
from .ledger import count_in_flight, count_outstanding, count_possible_orphans
from .models import (
    CANCELLED, DONE, FAILED, INVALID, NEW, QUEUED, SENT, VERDICTS, BouncerBatch, UserBatch,
    UserBatchEmail, result_model,
)
from .ratelimit import requests_in_window

COUNT_KEYS = VERDICTS + (INVALID, FAILED, CANCELLED, "pending")
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
    Result = result_model(batch.check_type)
    counts = dict.fromkeys(COUNT_KEYS, 0)
    query = (Row.select(Row.status, Result.status, fn.COUNT(Row.id))
             .join(Result, JOIN.LEFT_OUTER, on=(
                 (Result.email_global == Row.email_global) & (Row.status == DONE)))
             .where(Row.batch == batch.id)
             .group_by(Row.status, Result.status))
    for row_status, verdict, n in query.tuples():
        counts[outcome(row_status, verdict)] += n
    return counts


def outcome(row_status, verdict):
    if row_status == DONE:
        return verdict if verdict in VERDICTS else "unknown"
    if row_status in (INVALID, FAILED, CANCELLED):
        return row_status
    return "pending"


def recent_batches(limit=20, user_id=None, status=None, before=None):
    """The latest user batches with their progress, newest first (`before`: ids below it)."""
    query = UserBatch.select().order_by(UserBatch.id.desc()).limit(limit)
    if user_id is not None:
        query = query.where(UserBatch.user_id == user_id)
    if status is not None:
        query = query.where(UserBatch.status == status)
    if before is not None:
        query = query.where(UserBatch.id < before)
    batches = list(query)
    pending = pending_counts([b.id for b in batches])
    return [{"batch_id": b.id, "user_id": b.user_id, "check_type": b.check_type, "status": b.status,
             "total": b.total, "done": b.total - pending.get(b.id, 0),
             "created_at": iso(b.created_at)} for b in batches]


def pending_counts(batch_ids):
    """{batch id: rows admitted and not yet final}."""
    if not batch_ids:
        return {}
    query = (Row.select(Row.batch, fn.COUNT(Row.id))
             .where(Row.batch.in_(batch_ids) & Row.status.in_((QUEUED, SENT)))
             .group_by(Row.batch))
    return dict(query.tuples())


def queue_overview(settings):
    """Per check type: emails waiting to be admitted, queued and in flight, Bouncer batches in
    flight against the cap; the request budget in use; possible orphans."""
    rows = {(t, s): n for t, s, n in (
        Row.select(Row.check_type, Row.status, fn.COUNT(Row.id))
        .where(Row.status.in_((QUEUED, SENT))).group_by(Row.check_type, Row.status).tuples())}
    new = dict(Row.select(UserBatch.check_type, fn.COUNT(Row.id)).join(UserBatch)
               .where(Row.status == NEW).group_by(UserBatch.check_type).tuples())
    return {
        "check_types": {
            check_type: {
                "new_emails": new.get(check_type, 0),
                "queued_emails": rows.get((check_type, QUEUED), 0),
                "sent_emails": rows.get((check_type, SENT), 0),
                "outstanding_batches": count_outstanding(check_type),
                "in_flight_batches": count_in_flight(check_type),
                "max_outstanding": settings.max_outstanding,
            } for check_type in CHECK_TYPES},
        "rate_limit": {
            "requests_last_60s": requests_in_window(),
            "buffer": settings.rate_limit_buffer,
            "bouncer_limit": settings.rate_limit_per_minute,
        },
        "possible_orphans": count_possible_orphans(),
        "outstanding": [
            {"id": b.id, "check_type": b.check_type, "bouncer_id": b.bouncer_id,
             "addresses": b.quantity, "bouncer_status": b.bouncer_status, "sent_at": iso(b.sent_at)}
            for b in BouncerBatch.select().where(BouncerBatch.status == "outstanding")
            .order_by(BouncerBatch.id)],
    }


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


def spreadsheet_safe(value):
    """A cell a spreadsheet will not run as a formula (addresses may legally start with = + - @)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value

