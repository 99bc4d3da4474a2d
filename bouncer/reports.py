"""Reading what the queue did: user batch progress, the results of a batch, the overview."""
from peewee import JOIN, fn

from .config import CHECK_TYPES
from .errors import NotFound
from .ledger import count_in_flight, count_outstanding, count_possible_orphans
from .models import (
    DONE, FAILED, INVALID, QUEUED, VERDICTS, BouncerBatch, UserBatch, UserBatchEmail, result_model,
)
from .ratelimit import requests_in_window

COUNT_KEYS = VERDICTS + (INVALID, FAILED, "pending")
RESULT_COLUMNS = ("email", "status", "reason", "score", "accept_all", "disposable", "free", "role",
                  "disabled", "full_mailbox", "provider")
EXPORT_PAGE = 10000


def get_user_batch(batch_id):
    batch = UserBatch.get_or_none(UserBatch.id == batch_id)
    if batch is None:
        raise NotFound("no user batch with id %s" % batch_id)
    return batch


def batch_status(batch_id):
    """The contract's status object for one user batch."""
    batch = get_user_batch(batch_id)
    counts = count_outcomes(batch)
    return {
        "batch_id": batch.id, "user": batch.user, "check_type": batch.check_type,
        "status": batch.status, "total": batch.total,
        "done": batch.total - counts["pending"], "counts": counts,
        "created_at": batch.created_at.isoformat() + "Z",
        "completed_at": batch.completed_at.isoformat() + "Z" if batch.completed_at else None,
        "failure_reason": batch.failure_reason,
    }


def count_outcomes(batch):
    Row, Result = UserBatchEmail, result_model(batch.check_type)
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
    if row_status in (INVALID, FAILED):
        return row_status
    return "pending"


def recent_batches(limit=20):
    """The latest user batches with their progress, newest first."""
    batches = list(UserBatch.select().order_by(UserBatch.id.desc()).limit(limit))
    pending = pending_counts([b.id for b in batches])
    return [{"batch_id": b.id, "user": b.user, "check_type": b.check_type, "status": b.status,
             "total": b.total, "done": b.total - pending.get(b.id, 0),
             "created_at": b.created_at.isoformat() + "Z"} for b in batches]


def pending_counts(batch_ids):
    if not batch_ids:
        return {}
    Row = UserBatchEmail
    query = (Row.select(Row.batch, fn.COUNT(Row.id))
             .where(Row.batch.in_(batch_ids) & Row.status.in_((QUEUED, "sent")))
             .group_by(Row.batch))
    return dict(query.tuples())


def queue_overview(settings):
    """Per check type: queued emails, batches in flight; and the request budget in use."""
    Row = UserBatchEmail
    queued = dict(Row.select(Row.check_type, fn.COUNT(Row.id))
                  .where(Row.status == QUEUED).group_by(Row.check_type).tuples())
    return {
        "check_types": {
            check_type: {
                "queued_emails": queued.get(check_type, 0),
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
             "addresses": b.quantity, "bouncer_status": b.bouncer_status,
             "sent_at": b.sent_at.isoformat() + "Z" if b.sent_at else None}
            for b in BouncerBatch.select().where(BouncerBatch.status == "outstanding")
            .order_by(BouncerBatch.id)],
    }


def iter_results(batch_id):
    """One dict per submitted row, in submission order, read a page at a time."""
    batch = get_user_batch(batch_id)
    Row, Result = UserBatchEmail, result_model(batch.check_type)
    after = -1
    while True:
        page = list(Row.select(Row.position, Row.email, Row.status, Row.failure_reason,
                               Result.status, Result.reason, Result.score, Result.accept_all,
                               Result.disposable, Result.free, Result.role, Result.disabled,
                               Result.full_mailbox, Result.provider)
                    .join(Result, JOIN.LEFT_OUTER, on=(
                        (Result.email_global == Row.email_global) & (Row.status == DONE)))
                    .where((Row.batch == batch.id) & (Row.position > after))
                    .order_by(Row.position).limit(EXPORT_PAGE).tuples())
        for row in page:
            yield result_row(row)
        if len(page) < EXPORT_PAGE:
            return
        after = page[-1][0]


def result_row(row):
    _, email, row_status, failure, verdict, reason, *details = row
    if row_status == DONE:
        return dict(zip(RESULT_COLUMNS, (email, verdict or "unknown", reason, *details)))
    status = row_status if row_status in (INVALID, FAILED) else "pending"
    return dict(zip(RESULT_COLUMNS, (email, status, failure) + (None,) * (len(RESULT_COLUMNS) - 3)))


def spreadsheet_safe(value):
    """A cell a spreadsheet will not run as a formula (addresses may legally start with = + - @)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
