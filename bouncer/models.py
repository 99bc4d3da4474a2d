"""Tables. Names of the four shared tables come from the original system.

Row life cycle of a submitted email (`UserBatchEmail.status`):
    queued -> sent (attached to a Bouncer batch of the ledger) -> done | failed
    invalid (failed the syntax check at submit; never sent)
A `sent` row whose ledger batch is rejected or abandoned goes back to `queued`.
"""
from peewee import (
    DatabaseProxy, DateTimeField, ForeignKeyField, IntegerField, Model, TextField,
)

database = DatabaseProxy()

# UserBatchEmail.status
QUEUED, SENT, DONE, INVALID, FAILED = "queued", "sent", "done", "invalid", "failed"
PENDING_STATES = (QUEUED, SENT)

# BouncerBatch.status: reserved -> outstanding -> completed | failed;
# reserved -> rejected (Bouncer refused the call) | abandoned (the cycle died before storing the id)
RESERVED, OUTSTANDING, COMPLETED, REJECTED, ABANDONED = (
    "reserved", "outstanding", "completed", "rejected", "abandoned")
IN_FLIGHT_STATES = (RESERVED, OUTSTANDING)

# UserBatch.status
BATCH_QUEUED, BATCH_PROCESSING, BATCH_COMPLETED, BATCH_FAILED = (
    "queued", "processing", "completed", "failed")

VERDICTS = ("deliverable", "risky", "undeliverable", "unknown")


class Reference(ForeignKeyField):
    """A link to another table's row, without a database constraint. The high-volume link
    columns are always written in the same transaction as the rows they point to; a constraint
    would only add a per-row check (on Postgres a trigger per row: measured 4.4x slower COPY of
    150k rows, 2x slower updates)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, _deferred=True, **kwargs)


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class UserBatch(BaseModel):
    user = TextField()
    check_type = TextField()
    status = TextField(default=BATCH_QUEUED)
    total = IntegerField(default=0)
    invalid = IntegerField(default=0)
    duplicates = IntegerField(default=0)
    created_at = DateTimeField()
    completed_at = DateTimeField(null=True)
    failure_reason = TextField(null=True)

    class Meta:
        table_name = "user_batches"
        indexes = ((("status", "id"), False),)


class EmailGlobal(BaseModel):
    """One row per stripped address, shared by every user and check type."""
    email = TextField(unique=True)
    created_at = DateTimeField()

    class Meta:
        table_name = "emails_global"


class BouncerBatch(BaseModel):
    """The ledger: one row per attempt to create a Bouncer batch, written before the call."""
    check_type = TextField()
    status = TextField(default=RESERVED)
    bouncer_id = TextField(null=True, unique=True)
    quantity = IntegerField()
    reserved_at = DateTimeField()
    sent_at = DateTimeField(null=True)
    last_checked_at = DateTimeField(null=True)
    bouncer_status = TextField(null=True)
    finished_at = DateTimeField(null=True)
    failure_reason = TextField(null=True)

    class Meta:
        table_name = "bouncer_batches"
        indexes = ((("check_type", "status"), False),)


class BouncerBatchEmail(BaseModel):
    """One stripped address of a Bouncer batch in flight (reserved or outstanding), with the
    spelling that was sent. The rows of a batch are deleted when it ends, so the unique index
    over (check_type, email_global) is the database itself refusing a second in-flight batch of
    the same check type holding the same address."""
    bouncer_batch = Reference(BouncerBatch, backref="emails")
    # index=False: looked up only with its check type, through the unique index below.
    email_global = Reference(EmailGlobal, index=False)
    check_type = TextField()
    email_sent = TextField()

    class Meta:
        table_name = "bouncer_batch_emails"
        indexes = ((("check_type", "email_global"), True),)


class UserBatchEmail(BaseModel):
    """One submitted row, in submission order (`position`)."""
    # index=False: the unique (batch, position) index serves lookups by batch.
    batch = Reference(UserBatch, backref="emails", index=False)
    position = IntegerField()
    email = TextField()
    # Not indexed: rows are found by user batch, by Bouncer batch or in FIFO order, never by
    # address, and every index costs each of the 150k row updates of a full status cycle.
    email_global = Reference(EmailGlobal, null=True, index=False)
    check_type = TextField()
    status = TextField()
    bouncer_batch = Reference(BouncerBatch, null=True, index=False)
    failure_reason = TextField(null=True)
    completed_at = DateTimeField(null=True)

    class Meta:
        table_name = "user_batch_emails"
        indexes = (
            (("batch", "position"), True),         # export in submission order
            (("bouncer_batch", "batch"), False),   # one Bouncer batch's rows and their user batches
        )


# Partial indexes: a row is in them only while it waits, so completing a sent email (150k rows
# per status cycle at full load) rewrites neither, and the FIFO walk never sees finished rows.
UserBatchEmail.add_index(   # the FIFO claim: oldest user batch, then line
    UserBatchEmail.index(UserBatchEmail.check_type, UserBatchEmail.batch, UserBatchEmail.position,
                         name="user_batch_emails_fifo")
    .where(UserBatchEmail.status == QUEUED))
UserBatchEmail.add_index(   # is this user batch finished?
    UserBatchEmail.index(UserBatchEmail.batch, name="user_batch_emails_pending")
    .where(UserBatchEmail.status.in_(PENDING_STATES)))


class ResultBase(BaseModel):
    """The latest verdict for one stripped address, for one check type."""
    email_global = Reference(EmailGlobal, primary_key=True)
    status = TextField()
    reason = TextField(null=True)
    score = IntegerField(null=True)
    accept_all = TextField(null=True)
    disposable = TextField(null=True)
    free = TextField(null=True)
    role = TextField(null=True)
    disabled = TextField(null=True)
    full_mailbox = TextField(null=True)
    provider = TextField(null=True)
    raw = TextField()
    checked_at = DateTimeField()
    bouncer_batch_id = IntegerField(null=True, index=True)


class DeliverableResult(ResultBase):
    class Meta:
        table_name = "email_deliverable_results"


class CatchallResult(ResultBase):
    class Meta:
        table_name = "email_catchall_results"


class RateLimitTracker(BaseModel):
    """One row per Bouncer request, all processes and check types together."""
    requested_at = DateTimeField(index=True)
    kind = TextField()
    check_type = TextField(null=True)

    class Meta:
        table_name = "rate_limit_tracker"


RESULT_MODELS = {"deliverable": DeliverableResult, "catchall": CatchallResult}

ALL_MODELS = [
    UserBatch, EmailGlobal, BouncerBatch, BouncerBatchEmail, UserBatchEmail,
    DeliverableResult, CatchallResult, RateLimitTracker,
]


def result_model(check_type):
    return RESULT_MODELS[check_type]
