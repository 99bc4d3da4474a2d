"""The states of each state machine (rows, user batches, Bouncer batches, webhook deliveries)."""

# UserBatchEmail.status
NEW, QUEUED, SENT, DONE, INVALID, FAILED, CANCELLED = (
    "new", "queued", "sent", "done", "invalid", "failed", "cancelled")

ROW_STATES = (NEW, QUEUED, SENT, DONE, INVALID, FAILED, CANCELLED)

PENDING_STATES = (NEW, QUEUED, SENT)

FINAL_ROW_STATES = (DONE, INVALID, FAILED, CANCELLED)

# BouncerBatch.status: reserved -> outstanding -> completed | failed;
# reserved -> rejected (Bouncer refused the call) | abandoned (the cycle died before storing the id)
RESERVED, OUTSTANDING, COMPLETED, REJECTED, ABANDONED = (
    "reserved", "outstanding", "completed", "rejected", "abandoned")

IN_FLIGHT_STATES = (RESERVED, OUTSTANDING)

# UserBatch.status
BATCH_LOADING, BATCH_NEW, BATCH_QUEUED, BATCH_PROCESSING = "loading", "new", "queued", "processing"

BATCH_COMPLETED, BATCH_FAILED, BATCH_CANCELLED = "completed", "failed", "cancelled"

BATCH_STATES = (BATCH_LOADING, BATCH_NEW, BATCH_QUEUED, BATCH_PROCESSING, BATCH_COMPLETED,
                BATCH_FAILED, BATCH_CANCELLED)

ENDED_BATCH_STATES = (BATCH_COMPLETED, BATCH_FAILED, BATCH_CANCELLED)

# In line for the queue: its emails are admitted and packed.
LIVE_BATCH_STATES = (BATCH_QUEUED, BATCH_PROCESSING)

VERDICTS = ("deliverable", "risky", "undeliverable", "unknown")

# WebhookDelivery.state
PENDING, DELIVERED, GIVEN_UP, NO_TARGET = "pending", "delivered", "given up", "no target"

