"""Rows and user batches ending: the one place a user batch ends.

Row (`UserBatchEmail.status`): queued -> done | failed; new | queued -> cancelled; invalid rows
never move. User batch: queued -> processing -> completed, or failed with a reason, or cancelled.
Kept in step by the cycles, a few set-based statements at a time, so reading a batch's status
never needs to scan its rows. Each function that ends batches takes the ids the database says it
changed, and writes their webhook deliveries (outbox.py) in the same transaction.
"""

from peewee import SQL, Case, NodeList, fn

from bouncer.errors import Conflict
from bouncer.queue import outbox
from bouncer.queue.line import (
    batches_of_bouncer_batch, is_one_of, leave_line, leave_line_of_batch, not_admitted, riding_rows,
    rows_in_line_of, take_off_batch, take_off_rows,
)
from bouncer.states import ENDED_BATCH_STATES, BatchState, RowState
from bouncer.store.bulk import among, chunked
from bouncer.store.database import utcnow, write_transaction
from bouncer.store.models import QueuedEmail, RidingRows, UserBatch, UserBatchEmail

Row = UserBatchEmail
Line = QueuedEmail
Riding = RidingRows


def complete_rows_from_cache(row_ids, now, span=None):
    """Rows still in line (within `span`, see `leave_line`) are done: a fresh verdict of their
    address was already stored."""
    taken = leave_line(row_ids, span)
    if taken:
        (Row.update(status=RowState.DONE, completed_at=now)
         .where(among(Row.id, taken) & (Row.status == RowState.QUEUED)).execute())


def complete_sent_rows(ledger_id, now, except_rows=()):
    """Every row still riding on this batch has its verdict now (the missing ones ended), but
    `except_rows` (ids: back in line for a re-check)."""
    riding = Row.id.in_(riding_rows(ledger_id)) & (Row.status == RowState.QUEUED)
    if except_rows:
        riding &= ~among(Row.id, except_rows)
    return Row.update(status=RowState.DONE, completed_at=now, bouncer_batch=ledger_id).where(riding).execute()


def fail_sent_rows(ledger_id, reason, now, only_addresses=None):
    """End the rows riding on this batch (of `only_addresses`, when given) that get no verdict
    from it: failed with `reason`; or cancelled, when their user batch's cancel was asked for
    (nobody is waiting for them). Returns how many."""
    riding = Row.id.in_(riding_rows(ledger_id)) & (Row.status == RowState.QUEUED)
    if only_addresses is not None:
        if not only_addresses:
            return 0
        riding &= among(Row.email_global, only_addresses)
    of_cancelled = Row.batch.in_(UserBatch.select(UserBatch.id).where(
        UserBatch.id.in_(batches_of_bouncer_batch(ledger_id)) & UserBatch.cancelled_at.is_null(False)))
    cancelled = (Row.update(status=RowState.CANCELLED, completed_at=now, bouncer_batch=ledger_id)
                 .where(riding & of_cancelled).execute())
    return cancelled + (Row.update(status=RowState.FAILED, failure_reason=reason, completed_at=now,
                                   bouncer_batch=ledger_id).where(riding).execute())


def mark_batches_processing(batch_ids=(), ledger_id=None):
    """User batches with emails sent (to ledger batch `ledger_id`) or completed are processing."""
    targets = []
    if ledger_id is not None:
        targets.append(batches_of_bouncer_batch(ledger_id))
    if batch_ids:
        targets.append(batch_ids)
    for target in targets:
        (UserBatch.update(status=BatchState.PROCESSING)
         .where((UserBatch.status == BatchState.QUEUED) & is_one_of(UserBatch.id, target)).execute())


def complete_finished_batches(batch_ids, now):
    """End each of `batch_ids` (ids or a subquery) with no pending email left: completed, or
    cancelled when a cancel was asked for. A failed batch stays failed. Returns how many. (Rows
    that just got their verdicts must no longer ride: see `stop_riding`.)"""
    ended = (UserBatch.update(status=Case(None, ((UserBatch.cancelled_at.is_null(), BatchState.COMPLETED),),
                                          BatchState.CANCELLED),
                              completed_at=now)
             .where(is_one_of(UserBatch.id, batch_ids)
                    & UserBatch.status.in_((BatchState.NEW, BatchState.QUEUED, BatchState.PROCESSING))
                    & ~has_pending_rows())
             .returning(UserBatch.id, UserBatch.status).tuples().execute())
    return record_endings(ended, now)


def has_pending_rows():
    """Whether the user batch of the enclosing query has a row pending: in line, riding on a
    Bouncer batch (every queued row is one of these two), or not yet admitted. Each is one
    probe of an index; none reads a row's status, which no index holds.

    The three are asked in that order (a CASE: PostgreSQL orders the terms of an OR by their
    estimated cost), the rows not yet admitted last: on PostgreSQL, right after an admission
    their index still holds an entry for every row just admitted (until a vacuum), and the
    probe steps over them all, reading each row to find it admitted (measured: 30 ms for a
    batch of 5,000 just admitted), where a batch just admitted has its first row in line.
    The line and the rows not yet admitted are asked for the batch's first position, which only
    their index answers without reading every row: asked whether any row exists, PostgreSQL
    scanned the whole table when its statistics counted many rows of another batch (a host's
    large batch waiting, or in line: they are all one batch's, not spread over every batch as
    it assumes), or hashed the batch of every row not yet admitted when they counted none
    (40-80 ms a call with 300,000 waiting; a scan of the 30,000 rows in line in a test)."""
    first_in_line = Line.select(fn.MIN(Line.position)).where(rows_in_line_of(Line, UserBatch))
    riding = fn.EXISTS(Riding.select(SQL("1")).where(Riding.batch_id == UserBatch.id))
    first_not_admitted = Row.select(fn.MIN(Row.position)).where((Row.batch == UserBatch.id) & not_admitted())
    return Case(None, ((is_not_null(first_in_line), True), (riding, True)), is_not_null(first_not_admitted))


def is_not_null(first):
    """Whether the subquery `first` (a MIN) found a row."""
    return NodeList((first, SQL("IS NOT NULL")))


def fail_batches(batch_ids, reason, now):
    """End user batches failed with `reason`; their other emails still get their verdicts. One
    whose cancel was asked for is not failed: it ends cancelled once nothing of it is pending."""
    ended = (UserBatch.update(status=BatchState.FAILED, failure_reason=reason, completed_at=now)
             .where(is_one_of(UserBatch.id, batch_ids) & UserBatch.status.not_in(ENDED_BATCH_STATES)
                    & UserBatch.cancelled_at.is_null())
             .returning(UserBatch.id, UserBatch.status).tuples().execute())
    return record_endings(ended, now) + complete_finished_batches(batch_ids, now)


def cancel_batch(batch_id, now=None):
    """Cancel a user batch: its rows not yet sent end cancelled, those in flight finish with
    their verdicts, and the batch ends cancelled once nothing of it is in flight (at once when
    nothing is). Raises Conflict for a batch that already ended."""
    now = now or utcnow()
    with write_transaction():
        asked = (UserBatch.update(cancelled_at=now)
                 .where((UserBatch.id == batch_id)
                        & UserBatch.status.not_in(ENDED_BATCH_STATES + (BatchState.LOADING,)))
                 .execute())
        if not asked:
            batch = UserBatch.get_by_id(batch_id)
            raise Conflict("user batch %s is %s: %s" % (batch_id, batch.status, "it is still being written"
                                                         if batch.status == BatchState.LOADING else "it has ended"))
        batch = UserBatch.get_by_id(batch_id)
        cancelled = cancel_waiting_rows(batch, now)
        complete_finished_batches([batch_id], now)
    return cancelled


def cancel_waiting_rows(batch, now):
    """The rows of `batch` not yet sent (not admitted, or in line) end cancelled; returns how
    many."""
    cancelled = cancel_unadmitted(batch, now)
    for part in chunked(leave_line_of_batch(batch)):
        cancelled += end_cancelled(part, now)
    return cancelled


def cancel_live_rows(batch, now, row_ids=None, end_batch=True):
    """For an erasure: every pending row of `batch` (of `row_ids`, when given) ends cancelled,
    those riding on a Bouncer batch too (it flies on without them), and, with `end_batch`, the
    batch ends if nothing else of it is pending. Inside the transaction and under the locks of
    an erasure (erasure.py). Returns how many rows were cancelled."""
    if row_ids is None:
        cancelled = cancel_waiting_rows(batch, now)
        taken_off = take_off_batch(batch.id)
    else:
        cancelled = cancel_unadmitted(batch, now, row_ids) + end_cancelled(leave_line(row_ids), now)
        taken_off = take_off_rows(batch.id, row_ids)
    # {Bouncer batch: rows taken off it}: such a batch may be left with no live row.
    for part in chunked([r for rows in taken_off.values() for r in rows]):
        cancelled += end_cancelled(part, now)
    if end_batch:
        complete_finished_batches([batch.id], now)
    return cancelled


def cancel_unwanted_rows(unwanted, now):
    """Rows back from an attempt that brought them no verdict (a failed call, a reservation
    undone), whose user batch's cancel was asked for (`unwanted`: {user batch: row ids}), end
    cancelled rather than wait in line again; their batches end if nothing else of them is
    pending. Returns how many."""
    if not unwanted:
        return 0
    cancelled = sum(end_cancelled(part, now) for part in chunked([r for rows in unwanted.values() for r in rows]))
    complete_finished_batches(sorted(unwanted), now)
    return cancelled


def end_cancelled(row_ids, now):
    """Rows taken out of the line or off their Bouncer batch end cancelled; returns how many."""
    if not row_ids:
        return 0
    return (Row.update(status=RowState.CANCELLED, completed_at=now)
            .where(among(Row.id, row_ids) & (Row.status == RowState.QUEUED)).execute())


def cancel_unadmitted(batch, now, row_ids=None):
    """Rows of `batch` not yet admitted (of `row_ids`, when given) end cancelled, taking the
    batch's check type as admission would have given them; returns how many."""
    where = (Row.batch == batch.id) & not_admitted()
    if row_ids is not None:
        where &= among(Row.id, row_ids)
    return Row.update(status=RowState.CANCELLED, completed_at=now, check_type=batch.check_type).where(where).execute()


def record_endings(ended, now):
    ended = list(ended)
    outbox.record_endings(ended, now)
    return len(ended)

