"""The user side: submitted rows and user batches moving through their states.

Row (`UserBatchEmail.status`): queued -> sent (riding on a Bouncer batch of the ledger) ->
done | failed; invalid rows never move. A sent row whose Bouncer batch was rejected or
abandoned is queued again. User batch: queued -> processing -> completed, or failed with a
reason, or cancelled. Kept in step by the cycles, a few set-based statements at a time, so
reading a batch's status never needs to scan its emails.

This is the one place a user batch ends: each function that ends batches takes the ids the
database says it changed, and records those endings for their webhooks in the same
transaction.
"""
from peewee import Case, Query, fn

from . import webhooks
from .db import among, utcnow, write_transaction
from .errors import Conflict
from .models import (
    BATCH_CANCELLED, BATCH_COMPLETED, BATCH_FAILED, BATCH_LOADING, BATCH_NEW, BATCH_PROCESSING,
    BATCH_QUEUED, CANCELLED, DONE,
    ENDED_BATCH_STATES, FAILED, NEW, PENDING_STATES, QUEUED, SENT, UserBatch, UserBatchEmail,
)

Row = UserBatchEmail


# -- rows --

def send_rows(row_ids, ledger_id):
    """Queued rows ride on Bouncer batch `ledger_id`. Returns how many."""
    return (Row.update(status=SENT, bouncer_batch=ledger_id)
            .where(among(Row.id, row_ids) & (Row.status == QUEUED)).execute())


def complete_rows_from_cache(row_ids, now):
    if row_ids:
        (Row.update(status=DONE, completed_at=now)
         .where(among(Row.id, row_ids) & (Row.status == QUEUED)).execute())


def complete_sent_rows(ledger_id, now):
    """Every row still riding on this batch has its verdict now (the missing ones failed)."""
    return (Row.update(status=DONE, completed_at=now)
            .where((Row.bouncer_batch == ledger_id) & (Row.status == SENT)).execute())


def fail_sent_rows(ledger_id, reason, now, only_addresses=None):
    """Fail the rows riding on this batch (of `only_addresses`, when given) with `reason`."""
    riding = (Row.bouncer_batch == ledger_id) & (Row.status == SENT)
    if only_addresses is not None:
        if not only_addresses:
            return 0
        riding &= among(Row.email_global, only_addresses)
    return (Row.update(status=FAILED, failure_reason=reason, completed_at=now)
            .where(riding).execute())


def unsend_rows(ledger_id):
    """Rows of a reservation that was never sent go back to the queue where they were."""
    return (Row.update(status=QUEUED, bouncer_batch=None)
            .where((Row.bouncer_batch == ledger_id) & (Row.status == SENT)).execute())


def requeue_rows_of(ledger_ids):
    """Rows riding on failed attempts (`ledger_ids`: ids or a subquery) are queued again;
    `bouncer_batch` keeps naming the last attempt that carried them."""
    return Row.update(status=QUEUED).where(riding_on(ledger_ids)).execute()


def any_riding_on(ledger_ids):
    """Whether a row still rides on one of `ledger_ids` (what `requeue_rows_of` would queue)."""
    return Row.select().where(riding_on(ledger_ids)).exists()


def riding_on(ledger_ids):
    return (Row.status == SENT) & is_one_of(Row.bouncer_batch, ledger_ids)


# -- user batches --

def batches_of_bouncer_batch(ledger_id):
    return Row.select(Row.batch).distinct().where(Row.bouncer_batch == ledger_id)


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
    cancelled when a cancel was asked for. A failed batch stays failed. Returns how many."""
    pending = Row.select(Row.id).where((Row.batch == UserBatch.id) & Row.status.in_(PENDING_STATES))
    ended = (UserBatch.update(status=Case(None, ((UserBatch.cancelled_at.is_null(), BATCH_COMPLETED),),
                                          BATCH_CANCELLED),
                              completed_at=now)
             .where(is_one_of(UserBatch.id, batch_ids)
                    & UserBatch.status.in_((BATCH_NEW, BATCH_QUEUED, BATCH_PROCESSING))
                    & ~fn.EXISTS(pending))
             .returning(UserBatch.id, UserBatch.status).tuples().execute())
    return record_endings(ended, now)


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
        cancelled = (Row.update(status=CANCELLED, completed_at=now)
                     .where((Row.batch == batch_id) & Row.status.in_((NEW, QUEUED))).execute())
        complete_finished_batches([batch_id], now)
    return cancelled


def record_endings(ended, now):
    ended = list(ended)
    webhooks.record_endings(ended, now)
    return len(ended)


def is_one_of(column, values):
    """`column` in `values`: a subquery, or a collection of ids."""
    if isinstance(values, Query):
        return column.in_(values)
    return among(column, values)
