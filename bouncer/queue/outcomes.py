"""The status object of a user batch (design.md, "Status object"): what every door shows of it,
and what a webhook carries. Its counts are of rows, one query per check type for any number of
batches; a batch whose rows were pruned shows the counts kept when they were removed.
`rechecking` counts the pending rows whose greylisted verdict is being tried again (back in line
until Bouncer's `retryAfter`, or sent again); they are among `pending`. What the batch waits for
(weight, place in line, estimated start) is waiting.py's."""
import json

from peewee import JOIN, Case, fn

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
    counts = dict(counts)
    rechecking = counts.pop(RECHECKING, 0)
    waiting = waiting if waiting is not None else waiting_of([batch])[batch.id]
    total = sum(counts.values())
    return {
        "batch_id": batch.id, "user_id": batch.user_id, "check_type": batch.check_type,
        "status": batch.status, "total": total, "done": total - counts["pending"], "counts": counts,
        "rechecking": rechecking, "created_at": iso(batch.created_at), "completed_at": iso(batch.completed_at),
        "failure_reason": batch.failure_reason, "pruned_at": iso(batch.pruned_at), **waiting,
    }


RECHECKING = "rechecking"   # beside the counts while they are read, not one of them


def count_outcomes(batch):
    """{outcome: rows} of one batch: each verdict, invalid, failed, cancelled and pending (and,
    among pending, `rechecking`)."""
    return count_outcomes_of([batch])[batch.id]


def count_outcomes_of(batches):
    """{batch id: {outcome: rows}} of several batches, one query per check type."""
    counts = {b.id: dict.fromkeys(COUNT_KEYS + (RECHECKING,), 0) for b in batches}
    for batch in batches:
        if batch.kept_counts is not None:
            counts[batch.id].update(json.loads(batch.kept_counts))
    batches = [b for b in batches if b.kept_counts is None]
    rechecked = Case(None, ((Row.rechecks > 0, 1),), 0)
    for check_type in {b.check_type for b in batches}:
        Result = result_model(check_type)
        query = (Row.select(Row.batch, Row.status, Result.status, rechecked, fn.COUNT(Row.id))
                 .join(Result, JOIN.LEFT_OUTER, on=(
                     (Result.email_global == Row.email_global) & (Row.status == RowState.DONE)))
                 .where(among(Row.batch, [b.id for b in batches if b.check_type == check_type]))
                 .group_by(Row.batch, Row.status, Result.status, rechecked))
        for batch_id, row_status, verdict, again, n in query.tuples():
            kind = outcome(row_status, verdict)
            counts[batch_id][kind] += n
            if again and kind == "pending":
                counts[batch_id][RECHECKING] += n
    return counts


def outcome(row_status, verdict):
    if row_status == RowState.DONE:
        return verdict if verdict in VERDICTS else "unknown"
    if row_status in (RowState.INVALID, RowState.FAILED, RowState.CANCELLED):
        return row_status
    return "pending"

