"""Tables. Names of the four shared tables come from the original system; the two a host
application writes (`user_batches`, `user_batch_emails`) are created by schema.py from SQL of
their own, with database-side defaults and checks, and described here for the queue's use.

A user batch (`UserBatch.status`):
    loading (a loader still writing its slices: invisible to the queue)
    -> new (written, not yet noticed by the queue)
    -> queued (in line: its place `fifo_order` taken) -> processing (emails sent)
    -> completed | failed (with a reason) | cancelled
A submitted row (`UserBatchEmail.status`):
    new (written, not yet admitted) -> queued | invalid (failed the syntax check, never sent)
    queued -> done | failed
    new | queued -> cancelled (its batch was cancelled before it was sent)
A queued row is either waiting in line (`QueuedEmail`) or riding on a Bouncer batch of the
ledger (`RidingRows`); one whose batch is rejected or abandoned goes back in line, and so does
one whose address came back greylisted (until Bouncer's retryAfter: `QueuedEmail.not_before`). (`sent` is
what schema version 2 wrote for a riding row; no row is in it any more.)
"""

from peewee import (
    SQL, Check, CompositeKey, DateTimeField, DoubleField, FloatField, ForeignKeyField, IntegerField, Model,
    TextField,
)

from bouncer.names import CHECK_TYPES
from bouncer.states import BouncerBatchState, DeliveryState
from bouncer.store.database import database


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
    """Written by a host (user_id, check_type) or by our own doors; the rest has defaults."""
    user_id = TextField()
    check_type = TextField()
    status = TextField(null=True)            # database default: new
    total = IntegerField(null=True)          # database defaults: 0
    invalid = IntegerField(null=True)
    duplicates = IntegerField(null=True)
    created_at = DateTimeField(null=True)    # database default: the current UTC time
    fifo_order = IntegerField(null=True)     # its place in line, taken when it became visible
    completed_at = DateTimeField(null=True)
    failure_reason = TextField(null=True)
    callback_url = TextField(null=True)
    cancelled_at = DateTimeField(null=True)  # cancel asked for; the batch ends once nothing flies
    source = TextField(null=True)            # cli, api, library; none for a host's own rows
    loader_seen_at = DateTimeField(null=True)  # our loaders' heartbeat while `loading`
    pruned_at = DateTimeField(null=True)     # its rows were removed after the retention period
    kept_counts = TextField(null=True)       # its counts as they were then (JSON), for its status
    api_token_digest = TextField(null=True)  # the API token that created it (its SHA-256); none: SQL, CLI
    admitter_seen_at = DateTimeField(null=True)  # the claim of the cycle admitting a host's batch

    class Meta:
        table_name = "user_batches"


class EmailGlobal(BaseModel):
    """One row per stripped address, shared by every user and check type."""
    email = TextField(unique=True)
    created_at = DateTimeField()

    class Meta:
        table_name = "emails_global"


class BouncerBatch(BaseModel):
    """The ledger: one row per attempt to create a Bouncer batch, written before the call."""
    check_type = TextField()
    status = TextField(default=BouncerBatchState.RESERVED)
    bouncer_id = TextField(null=True, unique=True)
    quantity = IntegerField()
    reserved_at = DateTimeField()
    sent_at = DateTimeField(null=True)
    last_checked_at = DateTimeField(null=True)
    bouncer_status = TextField(null=True)
    finished_at = DateTimeField(null=True)
    failure_reason = TextField(null=True)
    bouncer_completed_at = DateTimeField(null=True)   # when Bouncer says it completed
    # Finishing it at Bouncer (stop it, refund what it had not verified): why and when that was
    # decided (BATCH_TIMEOUT, an operator, no live row left on it), when Bouncer took it.
    finish_reason = TextField(null=True)
    finish_asked_at = DateTimeField(null=True)
    finish_accepted_at = DateTimeField(null=True)
    credits = IntegerField(null=True)        # what Bouncer says it charged, once completed
    refunded = IntegerField(null=True)       # credits a finish gave back
    rechecks = IntegerField(default=0, constraints=[SQL("DEFAULT 0")])  # addresses sent again after greylisting
    deleted_at = DateTimeField(null=True)    # deleted at Bouncer (BOUNCER_DELETE_RESULTS), or found gone

    class Meta:
        table_name = "bouncer_batches"
        indexes = ((("check_type", "status"), False),)   # and schema.UNDELETED_INDEX


class BouncerBatchEmail(BaseModel):
    """One stripped address of a Bouncer batch in flight (reserved or outstanding), with the
    spelling that was sent. The rows of a batch are deleted when it ends, so the primary key
    (check_type, email_global) is the database itself refusing a second in-flight batch of the
    same check type holding the same address. (No serial id: on PostgreSQL its index and
    sequence were a third of the cost of writing a batch's addresses.)"""
    bouncer_batch = Reference(BouncerBatch, backref="emails")
    # index=False: looked up only with its check type, through the primary key.
    email_global = Reference(EmailGlobal, index=False)
    check_type = TextField()
    email_sent = TextField()

    class Meta:
        table_name = "bouncer_batch_emails"
        primary_key = CompositeKey("check_type", "email_global")


class UserBatchEmail(BaseModel):
    """One submitted row, at its `position` (1..n) in the batch. A host writes batch, position
    and email; admission fills the rest."""
    batch = ForeignKeyField(UserBatch, backref="emails", index=False)
    position = IntegerField()
    email = TextField()
    status = TextField(null=True)            # database default: new
    email_global = Reference(EmailGlobal, null=True, index=False)
    check_type = TextField(null=True)        # its batch's, copied at admission
    fifo_order = IntegerField(null=True)     # its batch's place in line, copied at admission
    bouncer_batch = Reference(BouncerBatch, null=True, index=False)
    failure_reason = TextField(null=True)
    completed_at = DateTimeField(null=True)
    rechecks = IntegerField(null=True)       # database default 0: times sent again after greylisting

    class Meta:
        table_name = "user_batch_emails"


class QueuedEmail(BaseModel):
    """The line: one row per admitted email waiting to be sent, with what packing reads of it.
    Written at admission, taken out (one DELETE) when a creation cycle sends, attaches, cancels
    or completes it from the cache. Kept apart from `user_batch_emails` and narrow, so a claim
    of 10,000 rows removes 10,000 small rows instead of rewriting 10,000 wide ones and their
    five index entries (measured on PostgreSQL: 2.0 s of a 4.2 s creation cycle).

    Packing walks the line by (check type, turn, place in line, position): under QUEUE_POLICY
    `fifo` every turn is 0, so the walk is the FIFO; under `fair` a row's turn is its start tag
    in start-time fair queueing over users (queue/fairness.py). The second index finds one
    user's rows (and, through its place in line, one user batch's)."""
    row = Reference(UserBatchEmail, primary_key=True, column_name="row_id")
    batch_id = IntegerField()
    check_type = TextField()
    fifo_order = IntegerField()
    position = IntegerField()
    email_global = Reference(EmailGlobal, index=False)
    email = TextField()
    rechecks = IntegerField(default=0, constraints=[SQL("DEFAULT 0")])   # the row's, copied
    not_before = DateTimeField(null=True)    # a re-check waits for Bouncer's retryAfter
    # Its user batch's user, copied when it joins the line; the turn: 0 under fifo, its start
    # tag under fair. (Database defaults too, for the rows an upgrade moves in with plain SQL.)
    user_id = TextField(default="", constraints=[SQL("DEFAULT ''")])
    turn = DoubleField(default=0.0, constraints=[SQL("DEFAULT 0")])

    class Meta:
        table_name = "queued_emails"
        indexes = ((("check_type", "turn", "fifo_order", "position"), False),
                   (("check_type", "user_id", "fifo_order", "position"), False))


class RidingRows(BaseModel):
    """Rows of one user batch riding on one Bouncer batch, their ids in one JSON array: written
    when the rows leave the line (one row per claim or attachment and user batch, not one per
    email: measured on PostgreSQL, a row per email cost 0.34 s of a 2.4 s creation cycle),
    deleted when the batch's verdicts (or its failure) reach them, or when they go back in line
    (their batch was rejected or abandoned, or never sent)."""
    bouncer_batch = Reference(BouncerBatch)
    batch_id = IntegerField(index=True)
    row_ids = TextField()        # a JSON array of user_batch_emails ids
    rows = IntegerField()        # how many

    class Meta:
        table_name = "riding_rows"


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
    bouncer_batch_id = IntegerField(null=True)   # which batch brought it (not indexed: read by no query)
    # An `unknown` whose receiving server asked to be tried again (greylisting): never reused
    # as a fresh verdict, and its address is not sent again before then.
    retry_after = DateTimeField(null=True)


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


class IdempotencyKey(BaseModel):
    """An API request's Idempotency-Key, per token (a digest of it, never the token), kept 24 h:
    a retry of the same request answers with the same batch, another request with it is 409."""
    token_digest = TextField()
    key = TextField()
    request_digest = TextField()
    batch_id = IntegerField()
    invalid_lines = TextField()      # JSON, as first answered
    created_at = DateTimeField(index=True)

    class Meta:
        table_name = "api_idempotency_keys"
        indexes = ((("token_digest", "key"), True),)


class WebhookDelivery(BaseModel):
    """One user batch ending, to be told: written in the transaction that ended the batch, so
    every ending has exactly one, and delivered (with retries) apart from the cycles."""
    batch_id = IntegerField(index=True)
    event = TextField()                    # batch.completed | batch.failed | batch.cancelled
    message_id = TextField(unique=True)    # webhook-id: the same on every attempt
    payload = TextField()                  # the JSON body, as of the ending
    url = TextField(null=True)             # where it went (the batch's callback_url or WEBHOOK_URL)
    state = TextField(default=DeliveryState.PENDING)
    attempts = IntegerField(default=0)
    next_attempt_at = DateTimeField()
    lease_until = DateTimeField(null=True)  # an attempt under way until then
    last_status = IntegerField(null=True)
    last_error = TextField(null=True)
    created_at = DateTimeField()
    finished_at = DateTimeField(null=True)

    class Meta:
        table_name = "webhook_deliveries"
        indexes = ((("state", "next_attempt_at"), False),)


class WebhookAttempt(BaseModel):
    delivery_id = IntegerField(index=True)
    attempted_at = DateTimeField()
    status_code = IntegerField(null=True)
    error = TextField(null=True)
    seconds = FloatField()

    class Meta:
        table_name = "webhook_attempts"


class JobRun(BaseModel):
    """How each repeating job last went, for /health, `status`, the console and /metrics: kept
    in the database, so every web process and the CLI read the same, with no Redis needed."""
    job_id = TextField(primary_key=True)
    last_started_at = DateTimeField(null=True)
    last_success_at = DateTimeField(null=True)
    last_failure_at = DateTimeField(null=True)
    last_error = TextField(null=True)
    failures_in_a_row = IntegerField(default=0)
    refused_status = IntegerField(null=True)     # Bouncer's 401, 402 or 429 that ended the last run
    refused_message = TextField(null=True)
    refusals_in_a_row = IntegerField(default=0)
    last_summary = TextField(null=True)
    last_seconds = FloatField(null=True)

    class Meta:
        table_name = "job_runs"


class Pause(BaseModel):
    """Batch creation held for a check type: by an operator, or by Bouncer saying the account is
    out of credits (then the creation cycle asks for the balance at most once a minute and
    resumes by itself)."""
    check_type = TextField(primary_key=True)
    cause = TextField()                          # operator | credits
    reason = TextField()
    since = DateTimeField()
    next_check_at = DateTimeField(null=True)     # credits: when to ask Bouncer again
    credits_left = IntegerField(null=True)       # credits: the balance Bouncer said it had

    class Meta:
        table_name = "pauses"


class AuditEntry(BaseModel):
    """An operator's action from the console: who, what, when."""
    at = DateTimeField(index=True)
    who = TextField()
    action = TextField()
    target = TextField()
    detail = TextField(null=True)

    class Meta:
        table_name = "audit_log"


class FifoCounter(BaseModel):
    """One row: the last place in line given to a user batch. Taking the next places is an
    UPDATE of this row, so on PostgreSQL the places are given in commit order."""
    last = IntegerField(default=0)

    class Meta:
        table_name = "fifo_counter"


class UserWeight(BaseModel):
    """A user's share under QUEUE_POLICY `fair`, written by a host with SQL or by `weight`; a
    user not here weighs 1. The database refuses a weight that is not above 0."""
    user_id = TextField(primary_key=True)
    weight = DoubleField(constraints=[Check("weight > 0")])

    class Meta:
        table_name = "user_weights"


class LineOrder(BaseModel):
    """The policy each check type's line is ordered by now (none: `fifo`). A creation cycle
    that runs with another QUEUE_POLICY orders the line anew and records it here, in one
    transaction; every admitter gives its rows turns by what this says."""
    check_type = TextField(primary_key=True)
    policy = TextField()

    class Meta:
        table_name = "line_orders"


class LineWeight(BaseModel):
    """Under `fair`: the weights a check type's line is numbered by (a user not here, 1), so a
    creation cycle finds the users whose weight a host changed since, and numbers their rows
    in line anew."""
    check_type = TextField()
    user_id = TextField()
    weight = DoubleField()

    class Meta:
        table_name = "line_weights"
        primary_key = CompositeKey("check_type", "user_id")


class SentShare(BaseModel):
    """How many new addresses each user put into a Bouncer batch, written with its
    reservation: the users' shares of what was sent (the console's last hour), without reading
    the rows. Kept as long as the request history (ratelimit.KEEP_HISTORY)."""
    bouncer_batch = Reference(BouncerBatch)
    check_type = TextField()
    user_id = TextField()
    addresses = IntegerField()
    reserved_at = DateTimeField(index=True)

    class Meta:
        table_name = "sent_shares"


class SchemaVersion(BaseModel):
    version = IntegerField()

    class Meta:
        table_name = "schema_version"


RESULT_MODELS = dict(zip(CHECK_TYPES, (DeliverableResult, CatchallResult)))
# Created by Peewee from these definitions; the host-facing tables have SQL of their own.
INTERNAL_MODELS = [
    EmailGlobal, BouncerBatch, BouncerBatchEmail, QueuedEmail, RidingRows, DeliverableResult, CatchallResult,
    RateLimitTracker, IdempotencyKey, WebhookDelivery, WebhookAttempt, JobRun, Pause, AuditEntry,
    FifoCounter, SchemaVersion, UserWeight, LineOrder, LineWeight, SentShare,
]


HOST_MODELS = [UserBatch, UserBatchEmail]
ALL_MODELS = HOST_MODELS + INTERNAL_MODELS


def result_model(check_type):
    return RESULT_MODELS[check_type]

