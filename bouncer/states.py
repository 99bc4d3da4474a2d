"""The state machines, one StrEnum each: a row, a user batch, a Bouncer batch, a webhook delivery.
A member is its own value in the database (`RowState.QUEUED == "queued"`).

Row (`user_batch_emails.status`):
    new (written, not yet admitted) -> queued (in line, or riding on a Bouncer batch)
                                    -> invalid (failed the syntax check, never sent)
    queued -> done (its verdict is stored) | failed (with a reason)
    queued -> queued (greylisted: back in line until Bouncer's retryAfter, `rechecks` + 1)
    new | queued -> cancelled (its user batch was cancelled before it was sent, or its Bouncer
                               batch ended without its verdict after the cancel)
User batch (`user_batches.status`):
    loading (a loader still writing its slices: invisible to the queue)
    -> new (written, not yet noticed by the queue)
    -> queued (in line: its place `fifo_order` taken) -> processing (rows sent)
    -> completed | failed (with a reason) | cancelled
Bouncer batch (`bouncer_batches.status`, the ledger):
    reserved (written before Bouncer is called) -> outstanding (Bouncer's id stored)
    -> completed (its download ingested) | failed (404, results removed, a refused finish)
    an outstanding batch may be marked to finish at Bouncer (BATCH_TIMEOUT, an operator, no
    live row left): still outstanding until its verified part is ingested (completed), or
    failed (Bouncer refused, or never completed it); a completed one may be deleted at Bouncer
    reserved -> rejected (Bouncer refused the call) | abandoned (the call went unanswered, or its
    cycle died during it: a possible orphan)
Webhook delivery (`webhook_deliveries.state`):
    pending -> delivered | given up (after the last retry) | no target (no URL or no secret)
"""
from enum import StrEnum


class RowState(StrEnum):
    NEW = "new"
    QUEUED = "queued"
    DONE = "done"
    INVALID = "invalid"
    FAILED = "failed"
    CANCELLED = "cancelled"


# How reports name a queued row riding on a Bouncer batch (`status`, /metrics, the console): a
# word of the reports, never a stored state (schema version 2 stored it; version 3 ended that).
SENT = "sent"
FINAL_ROW_STATES = (RowState.DONE, RowState.INVALID, RowState.FAILED, RowState.CANCELLED)


class BatchState(StrEnum):
    LOADING = "loading"
    NEW = "new"
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED_BATCH_STATES = (BatchState.COMPLETED, BatchState.FAILED, BatchState.CANCELLED)


class BouncerBatchState(StrEnum):
    RESERVED = "reserved"
    OUTSTANDING = "outstanding"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"
    ABANDONED = "abandoned"


IN_FLIGHT_STATES = (BouncerBatchState.RESERVED, BouncerBatchState.OUTSTANDING)


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    GIVEN_UP = "given up"
    NO_TARGET = "no target"


VERDICTS = ("deliverable", "risky", "undeliverable", "unknown")
