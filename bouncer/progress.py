"""The user side: submitted rows and user batches moving through their states.

Row (`UserBatchEmail.status`): queued -> done | failed; invalid rows never move. A queued row
waits in line (`QueuedEmail`) until a creation cycle takes it out: it rides on a Bouncer batch
of the ledger (`RidingRows`), or is completed from a fresh verdict, or cancelled. A row riding
on a batch that was rejected or abandoned goes back in line. User batch: queued -> processing ->
completed, or failed with a reason, or cancelled. Kept in step by the cycles, a few set-based
statements at a time, so reading a batch's status never needs to scan its emails.

This is the one place a user batch ends: each function that ends batches takes the ids the
database says it changed, and records those endings for their webhooks in the same
transaction.
"""
import json

from peewee import SQL, Case, Query, Tuple, fn

from . import webhooks
from .db import among, chunked, database, insert_tuples, is_postgres, utcnow, write_transaction
from .errors import Conflict
from .models import (
    BATCH_CANCELLED, BATCH_COMPLETED, BATCH_FAILED, BATCH_LOADING, BATCH_NEW, BATCH_PROCESSING,
    BATCH_QUEUED, CANCELLED, DONE,
    ENDED_BATCH_STATES, FAILED, NEW, QUEUED, QueuedEmail, RidingRows, UserBatch,
    UserBatchEmail,
)

Row = UserBatchEmail
Line = QueuedEmail
Riding = RidingRows

# What the line keeps of a row: each field of the line, and the field of the row it copies.
LINE_COPIES = ((Line.row, Row.id), (Line.batch_id, Row.batch), (Line.check_type, Row.check_type),
               (Line.fifo_order, Row.fifo_order), (Line.position, Row.position),
               (Line.email_global, Row.email_global), (Line.email, Row.email))
LINE_TARGET = tuple(line.column_name for line, _ in LINE_COPIES)
LINE_SOURCE = tuple(row.column_name for _, row in LINE_COPIES)


# -- rows --

# A row not yet admitted: it has no check type until admission (or a cancel) gives it its
# batch's, so its own index finds it without naming the status (see schema.py).
NOT_ADMITTED_SQL = "check_type IS NULL AND status = 'new'"


def not_admitted():
    return Row.check_type.is_null() & (Row.status == NEW)


def join_line(rows):
    """Rows, as `LINE_SOURCE` columns of `user_batch_emails`, wait in line."""
    insert_tuples(Line, [line.name for line, _ in LINE_COPIES], rows)


def leave_line(row_ids, span=None):
    """Take rows out of the line; returns the ids that were in it (a concurrent cancel may have
    taken some first). `span`, `(check type, first place, last place)` of a stretch of the line
    holding every one of them, lets the database find them by one range of the line's index,
    the ids only filtering it, rather than by one probe of the primary key per id (measured on
    PostgreSQL, 10,000 rows: 11 ms against 28 ms)."""
    if not row_ids:
        return []
    where = among(Line.row, row_ids)
    if span is not None:
        check_type, first, last = span
        place = Tuple(Line.fifo_order, Line.position)
        where &= (Line.check_type == check_type) & (place >= Tuple(*first)) & (place <= Tuple(*last))
    return take_out_of_line(where)


def leave_line_of_batch(batch):
    """Take every row of one user batch out of the line (through the line's index: a batch's
    rows share its place in line); returns their ids."""
    if batch.fifo_order is None:
        return []
    return take_out_of_line((Line.check_type == batch.check_type) & (Line.fifo_order == batch.fifo_order)
                            & (Line.batch_id == batch.id))


def take_out_of_line(where):
    """Delete the line's rows `where` holds for; returns their ids, so that a claim and a cancel
    racing for a row each act only on the rows they removed."""
    taken = Line.delete().where(where).returning(Line.row)
    return [r for (r,) in database.execute_sql(*taken.sql()).fetchall()]


def send_rows(rows, ledger_id, span=None):
    """Rows `(row id, user batch)` still in line (within `span`, see `leave_line`) leave it and
    ride on Bouncer batch `ledger_id`. Returns how many."""
    batch_of = dict(rows)
    by_batch = {}
    for row_id in leave_line(list(batch_of), span):
        by_batch.setdefault(batch_of[row_id], []).append(row_id)
    insert_tuples(Riding, ("bouncer_batch", "batch_id", "row_ids", "rows"),
                  [(ledger_id, batch, "[%s]" % ",".join(map(str, ids)), len(ids)) for batch, ids in by_batch.items()])
    return sum(map(len, by_batch.values()))


def complete_rows_from_cache(row_ids, now, span=None):
    """Rows still in line (within `span`, see `leave_line`) are done: a fresh verdict of their
    address was already stored."""
    taken = leave_line(row_ids, span)
    if taken:
        Row.update(status=DONE, completed_at=now).where(among(Row.id, taken) & (Row.status == QUEUED)).execute()


def riding_rows(ledger_id):
    """The ids of the rows riding on this Bouncer batch, as a subquery."""
    if is_postgres():
        sql = "(SELECT json_array_elements_text(r.row_ids::json)::int FROM riding_rows r WHERE r.bouncer_batch_id = %s)"
    else:
        sql = "(SELECT j.value FROM riding_rows r, json_each(r.row_ids) j WHERE r.bouncer_batch_id = ?)"
    return SQL(sql, [ledger_id])


def riders_of(ledger_ids):
    """{ledger id: [row ids]} of the rows riding on `ledger_ids` (ids or a subquery)."""
    found = {}
    for ledger_id, row_ids in (Riding.select(Riding.bouncer_batch, Riding.row_ids)
                               .where(is_one_of(Riding.bouncer_batch, ledger_ids)).tuples()):
        found.setdefault(ledger_id, []).extend(json.loads(row_ids))
    return found


def complete_sent_rows(ledger_id, now):
    """Every row still riding on this batch has its verdict now (the missing ones failed)."""
    return (Row.update(status=DONE, completed_at=now, bouncer_batch=ledger_id)
            .where(Row.id.in_(riding_rows(ledger_id)) & (Row.status == QUEUED)).execute())


def fail_sent_rows(ledger_id, reason, now, only_addresses=None):
    """Fail the rows riding on this batch (of `only_addresses`, when given) with `reason`."""
    riding = Row.id.in_(riding_rows(ledger_id)) & (Row.status == QUEUED)
    if only_addresses is not None:
        if not only_addresses:
            return 0
        riding &= among(Row.email_global, only_addresses)
    return (Row.update(status=FAILED, failure_reason=reason, completed_at=now, bouncer_batch=ledger_id)
            .where(riding).execute())


def forget_riders(ledger_id):
    """The batch's verdicts or its failure have reached its rows: none rides on it any more."""
    Riding.delete().where(Riding.bouncer_batch == ledger_id).execute()


def unsend_rows(ledger_id):
    """Rows of a reservation that was never sent go back in line where they were (the ledger
    keeps no trace of it, so the rows do not name it)."""
    return requeue_rows_of([ledger_id], name_attempt=False)


def requeue_rows_of(ledger_ids, name_attempt=True):
    """Rows riding on failed attempts (`ledger_ids`: ids or a subquery) go back in line where
    they were; `bouncer_batch` names the last attempt that carried them. Returns how many."""
    count = 0
    for ledger_id, row_ids in riders_of(ledger_ids).items():
        for part in chunked(row_ids):
            back = (Row.select(*[row for _, row in LINE_COPIES])
                    .where(among(Row.id, part) & (Row.status == QUEUED)).tuples())
            back = database.execute_sql(*back.sql()).fetchall()
            join_line(back)
            if name_attempt:
                Row.update(bouncer_batch=ledger_id).where(among(Row.id, part)).execute()
            count += len(back)
    Riding.delete().where(is_one_of(Riding.bouncer_batch, ledger_ids)).execute()
    return count


def any_riding_on(ledger_ids):
    """Whether a row still rides on one of `ledger_ids` (what `requeue_rows_of` would queue)."""
    return Riding.select().where(is_one_of(Riding.bouncer_batch, ledger_ids)).exists()


# -- user batches --

def batches_of_bouncer_batch(ledger_id):
    """The user batches with a row riding on this Bouncer batch."""
    return Riding.select(Riding.batch_id).distinct().where(Riding.bouncer_batch == ledger_id)


def mark_batches_processing(batch_ids=(), ledger_id=None):
    """User batches with emails sent (to ledger batch `ledger_id`) or completed are processing."""
    targets = []
    if ledger_id is not None:
        targets.append(batches_of_bouncer_batch(ledger_id))
    if batch_ids:
        targets.append(batch_ids)
    for target in targets:
        (UserBatch.update(status=BATCH_PROCESSING)
         .where((UserBatch.status == BATCH_QUEUED) & is_one_of(UserBatch.id, target)).execute())


def complete_finished_batches(batch_ids, now):
    """End each of `batch_ids` (ids or a subquery) with no pending email left: completed, or
    cancelled when a cancel was asked for. A failed batch stays failed. Returns how many. (Rows
    that just got their verdicts must no longer ride: see `forget_riders`.)"""
    ended = (UserBatch.update(status=Case(None, ((UserBatch.cancelled_at.is_null(), BATCH_COMPLETED),),
                                          BATCH_CANCELLED),
                              completed_at=now)
             .where(is_one_of(UserBatch.id, batch_ids)
                    & UserBatch.status.in_((BATCH_NEW, BATCH_QUEUED, BATCH_PROCESSING))
                    & ~has_pending_rows())
             .returning(UserBatch.id, UserBatch.status).tuples().execute())
    return record_endings(ended, now)


def has_pending_rows():
    """Whether the user batch of the enclosing query has a row pending: not yet admitted, in
    line, or riding on a Bouncer batch (every queued row is one of the last two). Each is one
    probe of an index; none reads a row's status, which no index holds."""
    return (fn.EXISTS(Row.select(SQL("1")).where((Row.batch == UserBatch.id) & not_admitted()))
            | fn.EXISTS(Line.select(SQL("1")).where((Line.check_type == UserBatch.check_type)
                                                    & (Line.fifo_order == UserBatch.fifo_order)
                                                    & (Line.batch_id == UserBatch.id)))
            | fn.EXISTS(Riding.select(SQL("1")).where(Riding.batch_id == UserBatch.id)))


def fail_batches(batch_ids, reason, now):
    """End user batches failed with `reason`; their other emails still get their verdicts."""
    ended = (UserBatch.update(status=BATCH_FAILED, failure_reason=reason, completed_at=now)
             .where(is_one_of(UserBatch.id, batch_ids) & UserBatch.status.not_in(ENDED_BATCH_STATES))
             .returning(UserBatch.id, UserBatch.status).tuples().execute())
    return record_endings(ended, now)


def cancel_batch(batch_id, now=None):
    """Cancel a user batch: its rows not yet sent end cancelled, those in flight finish with
    their verdicts, and the batch ends cancelled once nothing of it is in flight (at once when
    nothing is). Raises Conflict for a batch that already ended."""
    now = now or utcnow()
    with write_transaction():
        asked = (UserBatch.update(cancelled_at=now)
                 .where((UserBatch.id == batch_id)
                        & UserBatch.status.not_in(ENDED_BATCH_STATES + (BATCH_LOADING,)))
                 .execute())
        if not asked:
            batch = UserBatch.get_by_id(batch_id)
            raise Conflict("user batch %s is %s: %s" % (batch_id, batch.status, "it is still being written"
                                                         if batch.status == BATCH_LOADING else "it has ended"))
        batch = UserBatch.get_by_id(batch_id)
        cancelled = cancel_unadmitted(batch, now)
        for part in chunked(leave_line_of_batch(batch)):
            cancelled += (Row.update(status=CANCELLED, completed_at=now)
                          .where(among(Row.id, part) & (Row.status == QUEUED)).execute())
        complete_finished_batches([batch_id], now)
    return cancelled


def cancel_unadmitted(batch, now, row_ids=None):
    """Rows of `batch` not yet admitted (of `row_ids`, when given) end cancelled, taking the
    batch's check type as admission would have given them; returns how many."""
    where = (Row.batch == batch.id) & not_admitted()
    if row_ids is not None:
        where &= among(Row.id, row_ids)
    return Row.update(status=CANCELLED, completed_at=now, check_type=batch.check_type).where(where).execute()


def record_endings(ended, now):
    ended = list(ended)
    webhooks.record_endings(ended, now)
    return len(ended)


def is_one_of(column, values):
    """`column` in `values`: a subquery, or a collection of ids."""
    if isinstance(values, Query):
        return column.in_(values)
    return among(column, values)
