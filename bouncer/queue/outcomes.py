"""The status object of a user batch (design.md, "Status object"): what every door shows of it,
and what a webhook carries. Its counts are of rows, one query per check type for any number of
batches; what the batch waits for (weight, place in line, estimated start) is waiting.py's."""

from peewee import JOIN, fn

from bouncer.queue.waiting import waiting_of
from bouncer.states import VERDICTS, RowState
from bouncer.store.bulk import among
from bouncer.store.models import UserBatchEmail, result_model

Row = UserBatchEmail
COUNT_KEYS = VERDICTS + (RowState.INVALID, RowState.FAILED, RowState.CANCELLED, "pending")


def iso(moment):
    return moment.isoformat() + "Z" if moment else None


def status_object(batch, counts=None, waiting=None):
    """`counts` (count_outcomes) and `waiting` (waiting.waiting_of) when they were read in bulk."""
    counts = counts if counts is not None else count_outcomes(batch)
    waiting = waiting if waiting is not None else waiting_of([batch])[batch.id]
    total = sum(counts.values())
    return {
        "batch_id": batch.id, "user_id": batch.user_id, "check_type": batch.check_type,
        "status": batch.status, "total": total, "done": total - counts["pending"], "counts": counts,
        "created_at": iso(batch.created_at), "completed_at": iso(batch.completed_at),
        "failure_reason": batch.failure_reason, **waiting,
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
                     (Result.email_global == Row.email_global) & (Row.status == RowState.DONE)))
                 .where(among(Row.batch, [b.id for b in batches if b.check_type == check_type]))
                 .group_by(Row.batch, Row.status, Result.status))
        for batch_id, row_status, verdict, n in query.tuples():
            counts[batch_id][outcome(row_status, verdict)] += n
    return counts


def outcome(row_status, verdict):
    if row_status == RowState.DONE:
        return verdict if verdict in VERDICTS else "unknown"
    if row_status in (RowState.INVALID, RowState.FAILED, RowState.CANCELLED):
        return row_status
    return "pending"

