"""Erasure: what the service holds of a person, removed on request (design.md, "Personal data").

Where a user batch keeps its user and their addresses: `user_batches` (user id, callback URL);
`user_batch_emails` (each row as submitted); the line (`queued_emails`, the address as
submitted) and the riding rows (row ids); `bouncer_batch_emails` (the spelling sent to Bouncer
for an address in flight); `emails_global` (the stripped address) and its verdicts (`raw`,
Bouncer's record, names the spelling sent); `webhook_deliveries` (payloads: status objects
naming the user) and their `webhook_attempts`; `api_idempotency_keys` (the batch an API request
made, with its invalid lines).

Rows are erased in two steps. First their pending rows end `cancelled` through the cancel path
(progress.cancel_live_rows): out of the line and off the Bouncer batches they ride on, which fly
on without them. Then the rows go (or, for an address, are blanked) a bounded slice at a time,
each slice with what it leaves behind: an address no row names any more goes with its verdicts
and its place in flight (Bouncer's record of it is then ignored as unexpected); one that others
still hold stays, and the spelling it goes by, in flight and in its verdicts' records, becomes a
remaining holder's when no row holds it any more (spellings.py).

Every step is a short write transaction holding the locks the cycles take, always in this order
so that none waits in a circle: the reservations of both check types (packing never sends,
attaches or answers from the cache a row being erased), the addresses alone (admission never
names an address being removed), then, shared, the Bouncer batches in flight that the rows ride
on or the addresses fly in (an ingest of one runs whole before or after the step). A death
between two steps leaves every row either whole or gone; running the erasure again finishes it.
"""
import datetime
import logging
from dataclasses import dataclass, fields

from peewee import Tuple

from bouncer.addresses import strip_email_modifiers
from bouncer.names import ADDRESSES_LOCK, CHECK_TYPES, RESERVATION_LOCK
from bouncer.queue import progress
from bouncer.queue.line import ledgers_ridden_by, not_admitted
from bouncer.queue.spellings import oldest_spellings, respell_in_flight, respell_verdicts
from bouncer.states import RowState
from bouncer.store.bulk import among, chunked
from bouncer.store.database import lock_rows_for_share, lock_rows_for_update, serialize_on, write_transaction
from bouncer.store.models import (
    RESULT_MODELS, BouncerBatch, BouncerBatchEmail, EmailGlobal, IdempotencyKey, UserBatch, UserBatchEmail,
    WebhookAttempt, WebhookDelivery,
)

log = logging.getLogger(__name__)

Row = UserBatchEmail
InFlight = BouncerBatchEmail
SLICE = 2000            # rows erased in one transaction
MAX_ROUNDS = 5          # passes over an address's rows, for rows admitted while it is erased
ERASED_REASON = "erased on request"
# A loader renews its heartbeat with every slice: one heard from this recently is still writing.
LOADER_ALIVE = datetime.timedelta(minutes=5)


@dataclass
class Erased:
    """What an erasure removed (counts only: it never holds what it erased)."""
    batches: int = 0
    rows: int = 0
    cancelled: int = 0     # of those rows, pending ones cancelled first
    addresses: int = 0     # addresses no row held any more, removed
    verdicts: int = 0
    respelled: int = 0     # spellings of addresses others hold, replaced
    deliveries: int = 0
    keys: int = 0          # API idempotency records
    weights: int = 0       # the user's weight under QUEUE_POLICY=fair

    def add(self, other):
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def summary(self):
        parts = ["%d row(s)" % self.rows]
        if self.batches:
            parts.insert(0, "%d user batch(es)" % self.batches)
        named = (("cancelled", "of them pending, cancelled"), ("addresses", "address(es)"),
                 ("verdicts", "verdict(s)"), ("respelled", "spelling(s) of addresses others hold replaced"),
                 ("deliveries", "webhook delivery(ies)"), ("keys", "idempotency record(s)"),
                 ("weights", "weight"))
        parts += ["%d %s" % (getattr(self, name), words) for name, words in named if getattr(self, name)]
        return ", ".join(parts)


# -- the locks --

def lock_for_erasure(ledgers=None):
    """Inside a write transaction: the locks of an erasure step, in the order every step takes
    them (module docstring). `ledgers()` names the Bouncer batches to lock, asked once the other
    locks are held, so that none can start flying meanwhile."""
    for check_type in CHECK_TYPES:
        serialize_on(RESERVATION_LOCK % check_type)
    serialize_on(ADDRESSES_LOCK)
    ledger_ids = ledgers() if ledgers is not None else []
    if ledger_ids:
        list(lock_rows_for_share(BouncerBatch.select(BouncerBatch.id).where(among(BouncerBatch.id, ledger_ids)))
             .tuples())


def in_flight_ledgers(global_ids):
    """The Bouncer batches in flight holding one of these addresses."""
    if not global_ids:
        return []
    query = (InFlight.select(InFlight.bouncer_batch).distinct()
             .where(InFlight.check_type.in_(CHECK_TYPES) & among(InFlight.email_global, global_ids)))
    return [ledger_id for (ledger_id,) in query.tuples()]


# -- a user's batches --

def batches_of_user(user_id):
    return [b for (b,) in UserBatch.select(UserBatch.id).where(UserBatch.user_id == user_id)
            .order_by(UserBatch.id).tuples()]


def batch_being_written(batch_ids, now):
    """One of these batches whose loader (a submit under way) is still writing, or None."""
    alive = UserBatch.select(UserBatch.id).where(
        among(UserBatch.id, batch_ids) & (UserBatch.loader_seen_at >= now - LOADER_ALIVE))
    return alive.scalar()


def erase_batch(batch_id, now):
    """Erase one user batch whole: its rows, what they leave behind, its webhook deliveries and
    idempotency records, the batch itself. Returns what went."""
    erased = detach_batch(batch_id, now)
    while True:
        rows = list(Row.select(Row.id, Row.email_global).where(Row.batch == batch_id)
                    .order_by(Row.position).limit(SLICE).tuples())
        if rows:
            erased.add(delete_rows(batch_id, rows, now))
        elif drop_batch(batch_id, erased):
            return erased


def detach_batch(batch_id, now):
    """Every pending row of the batch ends cancelled (out of the line, off its Bouncer batches),
    the batch ends cancelled (a row a host writes into it later is cancelled, not admitted), and
    the deliveries go at once, the one its ending wrote before a sender can post it. Returns what
    went so far."""
    erased = Erased(batches=1)
    with write_transaction():
        lock_for_erasure(lambda: ledgers_ridden_by([batch_id]))
        (UserBatch.update(cancelled_at=now)
         .where((UserBatch.id == batch_id) & UserBatch.cancelled_at.is_null()).execute())
        batch = UserBatch.get_or_none(UserBatch.id == batch_id)
        if batch is not None:
            erased.cancelled = progress.cancel_live_rows(batch, now)
            erased.deliveries = drop_deliveries(WebhookDelivery.batch_id == batch_id)
    return erased


def delete_rows(batch_id, rows, now):
    """Delete one slice `(id, address id)` of a batch's rows, and settle the addresses they
    named. A row admitted since the batch was detached (a host's late row) is cancelled first."""
    global_ids = {gid for _, gid in rows if gid is not None}
    row_ids = [r for r, _ in rows]
    with write_transaction():
        lock_for_erasure(lambda: ledgers_ridden_by([batch_id]) + in_flight_ledgers(global_ids))
        cancelled = cancel_pending(batch_id, row_ids, now)
        deleted = Row.delete().where(among(Row.id, row_ids)).execute()
        erased = settle_addresses(global_ids)
    erased.rows, erased.cancelled = deleted, cancelled
    return erased


def cancel_pending(batch_id, row_ids, now):
    """Those of `row_ids` still pending end cancelled (the cancel path); nearly always there is
    none, which one read says."""
    pending = [r for (r,) in Row.select(Row.id).where(
        among(Row.id, row_ids) & Row.status.in_((RowState.NEW, RowState.QUEUED))).tuples()]
    if not pending:
        return 0
    return progress.cancel_live_rows(UserBatch.get_by_id(batch_id), now, pending, end_batch=False)


def drop_batch(batch_id, erased):
    """The batch goes, with its deliveries and idempotency records, once no row is left (its row
    locked first: a host writing a row into it meanwhile waits, then is refused). False when a
    row was written meanwhile (erased in the next round)."""
    with write_transaction():
        list(lock_rows_for_update(UserBatch.select(UserBatch.id).where(UserBatch.id == batch_id)).tuples())
        if Row.select().where(Row.batch == batch_id).exists():
            return False
        erased.deliveries += drop_deliveries(WebhookDelivery.batch_id == batch_id)
        erased.keys += IdempotencyKey.delete().where(IdempotencyKey.batch_id == batch_id).execute()
        UserBatch.delete().where(UserBatch.id == batch_id).execute()
    return True


def drop_deliveries(where):
    """Webhook deliveries `where` holds for, and their attempts; returns how many."""
    ids = [d for (d,) in WebhookDelivery.select(WebhookDelivery.id).where(where).tuples()]
    for part in chunked(ids):
        WebhookAttempt.delete().where(among(WebhookAttempt.delivery_id, part)).execute()
        WebhookDelivery.delete().where(among(WebhookDelivery.id, part)).execute()
    return len(ids)


# -- an address in every spelling --

def address_id(mailbox):
    return EmailGlobal.select(EmailGlobal.id).where(EmailGlobal.email == mailbox).scalar()


def forget_address(mailbox, now):
    """Erase the address `mailbox` (stripped) in every spelling: each row holding it is blanked
    in place (its position kept, no address, `failed` with the reason ERASED_REASON), then the
    address goes with its verdicts and its place in flight. Returns what went, or None when
    nothing holds it."""
    global_id = address_id(mailbox)
    erased = Erased()
    for _ in range(MAX_ROUNDS):
        found = rows_holding(mailbox, global_id)
        if not found:
            break
        for batch_id, row_ids in found.items():
            for part in chunked(row_ids, SLICE):
                erased.add(blank_rows(batch_id, part, now))
    if global_id is None and not erased.rows:
        return None
    if global_id is not None:
        erased.add(settle_now({global_id}))
    return erased


def rows_holding(mailbox, global_id):
    """{user batch id: [row ids]} of the rows holding the address: admitted ones name it; rows
    not yet admitted are read and stripped here (a host may have written it moments ago)."""
    found = {}
    if global_id is not None:
        for row_id, batch_id in Row.select(Row.id, Row.batch).where(Row.email_global == global_id).tuples():
            found.setdefault(batch_id, []).append(row_id)
    for row_id, batch_id in unadmitted_rows_of(mailbox):
        found.setdefault(batch_id, []).append(row_id)
    return found


def unadmitted_rows_of(mailbox, page=5000):
    """(row id, user batch id) of the rows not yet admitted whose text strips to `mailbox`, read
    a page at a time along the index of rows not yet admitted."""
    after = (0, 0)
    while True:
        rows = list(Row.select(Row.id, Row.batch, Row.position, Row.email)
                    .where(not_admitted() & (Tuple(Row.batch, Row.position) > Tuple(*after)))
                    .order_by(Row.batch, Row.position).limit(page).tuples())
        yield from ((r, b) for r, b, _, text in rows if strip_email_modifiers(text or "") == mailbox)
        if len(rows) < page:
            return
        after = rows[-1][1:3]


def blank_rows(batch_id, row_ids, now):
    """One slice of a batch's rows holding the address: the pending ones cancelled (the cancel
    path), then each blanked in place; the batch ends if nothing else is pending. The address
    itself goes once no row holds it (forget_address)."""
    with write_transaction():
        lock_for_erasure(lambda: ledgers_ridden_by([batch_id]))
        batch = UserBatch.get_or_none(UserBatch.id == batch_id)
        if batch is None:
            return Erased()
        cancelled = cancel_pending(batch_id, row_ids, now)
        blanked = (Row.update(email="", email_global=None, status=RowState.FAILED, failure_reason=ERASED_REASON,
                              completed_at=now)
                   .where(among(Row.id, row_ids)).execute())
        progress.complete_finished_batches([batch_id], now)
    return Erased(rows=blanked, cancelled=cancelled)


def settle_now(global_ids):
    """settle_addresses in a step of its own (an address that only verdicts or flight held)."""
    with write_transaction():
        lock_for_erasure(lambda: in_flight_ledgers(global_ids))
        return settle_addresses(global_ids)


# -- what the erased rows leave behind --

def settle_addresses(global_ids):
    """Inside an erasure step, after rows naming `global_ids` went: an address no row names any
    more goes, with its verdicts and its place in flight; one still named goes by a spelling a
    row holds. Returns what went."""
    erased = Erased()
    if not global_ids:
        return erased
    spellings = oldest_spellings(global_ids)
    erased.respelled = respell_in_flight(spellings) + respell_verdicts(spellings)
    gone = sorted(set(global_ids) - set(spellings))
    if gone:
        InFlight.delete().where(InFlight.check_type.in_(CHECK_TYPES) & among(InFlight.email_global, gone)).execute()
        for Result in RESULT_MODELS.values():
            erased.verdicts += Result.delete().where(among(Result.email_global, gone)).execute()
        erased.addresses = EmailGlobal.delete().where(among(EmailGlobal.id, gone)).execute()
    return erased

