"""Tables. Names of the four shared tables come from the original system.

Row life cycle of a submitted email (`UserBatchEmail.status`):
    queued -> sent (attached to a Bouncer batch of the ledger) -> done | failed
    invalid (failed the syntax check at submit; never sent)
A `sent` row whose ledger batch is rejected or abandoned goes back to `queued`.
"""
from peewee import (
    BooleanField, DatabaseProxy, DateTimeField, ForeignKeyField, IntegerField, Model, TextField,
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
    """One stripped address of one Bouncer batch, with the spelling that was sent.

    `in_flight` is TRUE while the batch is reserved or outstanding and NULL afterwards. The unique
    index over (check_type, email_global, in_flight) therefore lets the database itself refuse a
    second in-flight batch holding the same address (NULLs never collide), on SQLite and Postgres.
    """
    bouncer_batch = ForeignKeyField(BouncerBatch, backref="emails", on_delete="CASCADE")
    # index=False: looked up only with its check type, through the unique index below.
    email_global = ForeignKeyField(EmailGlobal, index=False)
    check_type = TextField()
    email_sent = TextField()
    in_flight = BooleanField(null=True, default=True)

    class Meta:
        table_name = "bouncer_batch_emails"
        indexes = ((("check_type", "email_global", "in_flight"), True),)


class UserBatchEmail(BaseModel):
    """One submitted row, in submission order (`position`)."""
    # index=False: the unique (batch, position) index serves lookups by batch.
    batch = ForeignKeyField(UserBatch, backref="emails", on_delete="CASCADE", index=False)
    position = IntegerField()
    email = TextField()
    email_global = ForeignKeyField(EmailGlobal, null=True)
    check_type = TextField()
    status = TextField()
    bouncer_batch = ForeignKeyField(BouncerBatch, null=True)
    failure_reason = TextField(null=True)
    completed_at = DateTimeField(null=True)

    class Meta:
        table_name = "user_batch_emails"
        # Foreign keys are indexed too: bouncer_batch (ingest one Bouncer batch), email_global
        # (attach repeats of an address being sent).
        indexes = ((("batch", "position"), True),)    # export in submission order


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
    email_global = ForeignKeyField(EmailGlobal, primary_key=True)
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
