"""User batch status: queued -> processing -> completed, or failed with a reason.

Kept in step by the cycles, a few set-based statements at a time, so reading a batch's status
never needs to scan its emails.
"""
from peewee import Query, fn

from .db import among
from .models import (
    BATCH_COMPLETED, BATCH_FAILED, BATCH_PROCESSING, BATCH_QUEUED, PENDING_STATES,
    UserBatch, UserBatchEmail,
)


def batches_of_bouncer_batch(ledger_id):
    return (UserBatchEmail.select(UserBatchEmail.batch).distinct()
            .where(UserBatchEmail.bouncer_batch == ledger_id))


def mark_batches_processing(batch_ids=(), ledger_id=None):
    """User batches with emails sent (to ledger batch `ledger_id`) or completed are processing."""
    targets = []
    if ledger_id is not None:
        targets.append(batches_of_bouncer_batch(ledger_id))
    if batch_ids:
        targets.append(batch_ids)
    for target in targets:
        (UserBatch.update(status=BATCH_PROCESSING)
         .where((UserBatch.status == BATCH_QUEUED) & is_one_of(target)).execute())


def complete_finished_batches(batch_ids, now):
    """Mark completed each of `batch_ids` (ids or a subquery) with no pending email left; a failed
    batch stays failed."""
    pending = UserBatchEmail.select(UserBatchEmail.id).where(
        (UserBatchEmail.batch == UserBatch.id) & UserBatchEmail.status.in_(PENDING_STATES))
    return (UserBatch.update(status=BATCH_COMPLETED, completed_at=now)
            .where(is_one_of(batch_ids)
                   & UserBatch.status.in_((BATCH_QUEUED, BATCH_PROCESSING))
                   & ~fn.EXISTS(pending))
            .execute())


def fail_batches(batch_ids, reason, now):
    """Mark user batches failed with `reason`; their other emails still get their verdicts."""
    return (UserBatch.update(status=BATCH_FAILED, failure_reason=reason, completed_at=now)
            .where(is_one_of(batch_ids) & (UserBatch.status != BATCH_FAILED))
            .execute())


def is_one_of(batch_ids):
    """UserBatch.id in `batch_ids`: a subquery, or a collection of ids."""
    if isinstance(batch_ids, Query):
        return UserBatch.id.in_(batch_ids)
    return among(UserBatch.id, batch_ids)
