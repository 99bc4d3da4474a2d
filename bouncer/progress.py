"""The user side: submitted rows and user batches moving through their states.

Row (`UserBatchEmail.status`): queued -> sent (riding on a Bouncer batch of the ledger) ->
done | failed; invalid rows never move. A sent row whose Bouncer batch was rejected or
abandoned is queued again. User batch: queued -> processing -> completed, or failed with a
reason. Kept in step by the cycles, a few set-based statements at a time, so reading a batch's
status never needs to scan its emails.
"""
from peewee import Query, fn

from .db import among
from .models import (
    BATCH_COMPLETED, BATCH_FAILED, BATCH_PROCESSING, BATCH_QUEUED, DONE, FAILED, PENDING_STATES,
    QUEUED, SENT, UserBatch, UserBatchEmail,
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
    return (Row.update(status=QUEUED)
            .where((Row.status == SENT) & is_one_of(Row.bouncer_batch, ledger_ids)).execute())


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
    """Mark completed each of `batch_ids` (ids or a subquery) with no pending email left; a failed
    batch stays failed."""
    pending = Row.select(Row.id).where((Row.batch == UserBatch.id) & Row.status.in_(PENDING_STATES))
    return (UserBatch.update(status=BATCH_COMPLETED, completed_at=now)
            .where(is_one_of(UserBatch.id, batch_ids)
                   & UserBatch.status.in_((BATCH_QUEUED, BATCH_PROCESSING))
                   & ~fn.EXISTS(pending))
            .execute())


def fail_batches(batch_ids, reason, now):
    """Mark user batches failed with `reason`; their other emails still get their verdicts."""
    return (UserBatch.update(status=BATCH_FAILED, failure_reason=reason, completed_at=now)
            .where(is_one_of(UserBatch.id, batch_ids) & (UserBatch.status != BATCH_FAILED))
            .execute())


def is_one_of(column, values):
    """`column` in `values`: a subquery, or a collection of ids."""
    if isinstance(values, Query):
        return column.in_(values)
    return among(column, values)
