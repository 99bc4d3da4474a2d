"""The queue side of the ledger: which pending emails go into the next Bouncer batch.

A Bouncer batch is *reserved* (ledger row, its addresses, its emails attached) in one transaction
before Bouncer is called, then *confirmed* with Bouncer's id, or *rejected* when the call fails.
Whatever a dead cycle leaves behind is recoverable from these rows alone:
- a reservation never confirmed is abandoned after RESERVATION_TIMEOUT, its emails queued again;
- the emails of a rejected attempt are queued again by the next cycle (or the end of this one).
"""
import datetime
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from peewee import Tuple

from .db import (
    among, database, insert_tuples, lock_rows_for_share, utcnow, write_transaction,
)
from .models import (
    ABANDONED, DONE, IN_FLIGHT_STATES, OUTSTANDING, QUEUED, REJECTED, RESERVED, SENT,
    BouncerBatch, BouncerBatchEmail, UserBatchEmail, result_model,
)
from .progress import complete_finished_batches, mark_batches_processing

log = logging.getLogger(__name__)

MIN_PAGE = 1000


@dataclass
class Plan:
    """What the next Bouncer batch will be, read in FIFO order."""
    send: dict = field(default_factory=dict)          # email_global id -> spelling to send
    send_rows: list = field(default_factory=list)     # row ids riding on those addresses
    attach: dict = field(default_factory=lambda: defaultdict(list))  # in-flight ledger id -> row ids
    cached: list = field(default_factory=list)        # row ids a fresh verdict completes
    touched_batches: set = field(default_factory=set)  # user batches of attached/cached rows


@dataclass
class Reservation:
    ledger_id: int | None
    emails: list          # the addresses to send, oldest first
    cached: int = 0       # rows completed from a fresh verdict, no credit spent
    attached: int = 0     # rows joined to a batch already in flight


def count_in_flight_batches(check_type):
    """Reserved and outstanding Bouncer batches: what counts against BOUNCER_MAX_OUTSTANDING."""
    return (BouncerBatch.select()
            .where((BouncerBatch.check_type == check_type)
                   & BouncerBatch.status.in_(IN_FLIGHT_STATES))
            .count())


def has_queued_emails(check_type):
    return (UserBatchEmail.select(UserBatchEmail.id)
            .where((UserBatchEmail.check_type == check_type) & (UserBatchEmail.status == QUEUED))
            .limit(1).exists())


def reserve_next_batch(check_type, batch_size, cache_days, now=None):
    """Reserve the next Bouncer batch: up to `batch_size` distinct stripped addresses, oldest
    pending first. Repeats of an address ride along; an address already in flight joins that
    batch; an address with a verdict younger than `cache_days` is completed from it.

    Returns a Reservation (ledger_id None when nothing needs sending), or None if the queue is
    empty."""
    now = now or utcnow()
    cutoff = now - datetime.timedelta(days=cache_days) if cache_days else None
    with write_transaction():
        plan = plan_next_batch(check_type, batch_size, cutoff)
        if not (plan.send or plan.attach or plan.cached):
            return None
        attached = attach_to_in_flight(plan.attach)
        complete_from_cache(plan.cached, now)
        ledger_id = write_reservation(check_type, plan, now) if plan.send else None
        mark_batches_processing(plan.touched_batches, ledger_id)
        complete_finished_batches(plan.touched_batches, now)
    return Reservation(ledger_id, list(plan.send.values()), len(plan.cached), attached)


def plan_next_batch(check_type, batch_size, cutoff):
    plan = Plan()
    after = None
    page_size = max(batch_size, MIN_PAGE)
    while len(plan.send) < batch_size:
        page = queued_page(check_type, after, page_size)
        global_ids = {row[4] for row in page}
        flying = in_flight_batches_of(check_type, global_ids)
        cached = fresh_verdicts_of(check_type, global_ids - flying.keys(), cutoff)
        for row_id, user_batch, position, email, global_id in page:
            if global_id in cached:
                plan.cached.append(row_id)
            elif global_id in flying:
                plan.attach[flying[global_id]].append(row_id)
            elif global_id in plan.send or len(plan.send) < batch_size:
                plan.send.setdefault(global_id, email)   # the oldest row's spelling is sent
                plan.send_rows.append(row_id)
                continue
            else:
                return plan  # full: this row opens the next batch
            plan.touched_batches.add(user_batch)
        if len(page) < page_size:
            return plan
        after = (page[-1][1], page[-1][2])
    return plan


def queued_page(check_type, after, limit):
    """Queued rows in FIFO order (oldest user batch, then line): a walk of the FIFO index."""
    Row = UserBatchEmail
    query = (Row.select(Row.id, Row.batch, Row.position, Row.email, Row.email_global)
             .where((Row.check_type == check_type) & (Row.status == QUEUED)))
    if after:
        query = query.where(Tuple(Row.batch, Row.position) > Tuple(*after))
    query = query.order_by(Row.batch, Row.position).limit(limit)
    # Plain rows straight from the cursor: per-row type conversion would cost more than the query.
    return database.execute_sql(*query.sql()).fetchall()


def in_flight_batches_of(check_type, global_ids):
    """{email_global id: ledger id of the in-flight batch holding it} for `global_ids`.
    Looked up apart from the FIFO walk, so a planner with stale statistics can at worst scan
    once, never once per row."""
    Sent = BouncerBatchEmail
    if not global_ids:
        return {}
    query = Sent.select(Sent.email_global, Sent.bouncer_batch).where(
        (Sent.check_type == check_type) & among(Sent.email_global, global_ids))
    return dict(database.execute_sql(*query.sql()).fetchall())


def fresh_verdicts_of(check_type, global_ids, cutoff):
    """The subset of `global_ids` with a verdict checked after `cutoff` (none if no cutoff)."""
    if cutoff is None or not global_ids:
        return set()
    Result = result_model(check_type)
    query = Result.select(Result.email_global).where(
        among(Result.email_global, global_ids) & (Result.checked_at > cutoff))
    return {gid for (gid,) in database.execute_sql(*query.sql()).fetchall()}


def attach_to_in_flight(attach):
    """Join rows to the in-flight batch that already holds their address. The ledger rows are
    locked first (FOR SHARE), so a concurrent ingest either finished before (the batch is no
    longer in flight: the rows stay queued) or waits until these rows are attached."""
    if not attach:
        return 0
    live = {batch_id for (batch_id,) in lock_rows_for_share(
        BouncerBatch.select(BouncerBatch.id).where(
            BouncerBatch.id.in_(list(attach)) & BouncerBatch.status.in_(IN_FLIGHT_STATES))).tuples()}
    attached = 0
    for ledger_id, row_ids in attach.items():
        if ledger_id in live:
            attached += (UserBatchEmail.update(status=SENT, bouncer_batch=ledger_id)
                         .where(among(UserBatchEmail.id, row_ids) & (UserBatchEmail.status == QUEUED))
                         .execute())
    return attached


def complete_from_cache(row_ids, now):
    if row_ids:
        (UserBatchEmail.update(status=DONE, completed_at=now)
         .where(among(UserBatchEmail.id, row_ids) & (UserBatchEmail.status == QUEUED)).execute())


def write_reservation(check_type, plan, now):
    """Ledger row, its addresses (the unique index refuses an address already in flight), and
    the rows of those addresses that the plan walked past, attached to it."""
    ledger = BouncerBatch.create(check_type=check_type, status=RESERVED, quantity=len(plan.send),
                                 reserved_at=now)
    insert_tuples(BouncerBatchEmail, ("bouncer_batch", "email_global", "check_type", "email_sent"),
                  [(ledger.id, global_id, check_type, email) for global_id, email in plan.send.items()])
    (UserBatchEmail.update(status=SENT, bouncer_batch=ledger.id)
     .where(among(UserBatchEmail.id, plan.send_rows) & (UserBatchEmail.status == QUEUED)).execute())
    return ledger.id


def confirm_sent(ledger_id, bouncer_id, now=None):
    """Store Bouncer's id: from here on the batch is followed to the end. False when the
    reservation was abandoned meanwhile (this cycle outlived RESERVATION_TIMEOUT)."""
    updated = (BouncerBatch.update(status=OUTSTANDING, bouncer_id=bouncer_id, sent_at=now or utcnow())
               .where((BouncerBatch.id == ledger_id) & (BouncerBatch.status == RESERVED))
               .execute())
    return updated == 1


def reject_reservation(ledger_id, reason, possible_orphan=False, now=None):
    """The call failed. Its addresses leave flight now; its emails stay parked until
    `requeue_rejected_emails`, so this cycle does not send them again (they wait for the next
    one, keeping FIFO for everything else). Bouncer refused it: `rejected`. It went unanswered
    (a timeout), so Bouncer may have created it anyway: `abandoned`, counted as a possible
    orphan."""
    status = ABANDONED if possible_orphan else REJECTED
    with write_transaction():
        (BouncerBatch.update(status=status, failure_reason=reason, finished_at=now or utcnow())
         .where((BouncerBatch.id == ledger_id) & (BouncerBatch.status == RESERVED)).execute())
        end_flight(ledger_id)


def cancel_reservation(ledger_id):
    """Undo a reservation that was never sent (no request budget left): its emails are queued
    again where they were, and the ledger keeps no trace of it."""
    with write_transaction():
        (UserBatchEmail.update(status=QUEUED, bouncer_batch=None)
         .where((UserBatchEmail.bouncer_batch == ledger_id) & (UserBatchEmail.status == SENT))
         .execute())
        end_flight(ledger_id)
        BouncerBatch.delete().where((BouncerBatch.id == ledger_id)
                                    & (BouncerBatch.status == RESERVED)).execute()


def end_flight(ledger_id):
    """The batch is no longer in flight: its addresses may be sent again."""
    BouncerBatchEmail.delete().where(BouncerBatchEmail.bouncer_batch == ledger_id).execute()


def requeue_rejected_emails(check_type):
    """Queue again the emails of rejected or abandoned attempts. Returns how many."""
    dead = BouncerBatch.select(BouncerBatch.id).where(
        (BouncerBatch.check_type == check_type) & BouncerBatch.status.in_((REJECTED, ABANDONED)))
    Row = UserBatchEmail
    with write_transaction():
        # bouncer_batch is kept: it names the last attempt that carried the email.
        return (Row.update(status=QUEUED)
                .where((Row.status == SENT) & Row.bouncer_batch.in_(dead))
                .execute())


def release_stale_reservations(check_type, older_than):
    """Abandon reservations that never got a Bouncer id by `older_than`: their cycle died.
    Bouncer may still have accepted the batch (the process died between its answer and the
    commit): each one is logged as a possible orphan. Returns [(ledger id, addresses)]."""
    with write_transaction():
        stale = list(BouncerBatch.select(BouncerBatch.id, BouncerBatch.quantity).where(
            (BouncerBatch.check_type == check_type) & (BouncerBatch.status == RESERVED)
            & (BouncerBatch.reserved_at < older_than)).tuples())
        for ledger_id, quantity in stale:
            (BouncerBatch.update(status=ABANDONED, finished_at=utcnow(),
                                 failure_reason="reservation abandoned: its cycle died before "
                                                "storing a Bouncer batch id")
             .where(BouncerBatch.id == ledger_id).execute())
            end_flight(ledger_id)
            log.warning("Reservation %s (%s, %s addresses) abandoned: possible orphan batch at "
                        "Bouncer; its emails are queued again", ledger_id, check_type, quantity)
    if stale:
        requeue_rejected_emails(check_type)
    return stale


def count_possible_orphans(check_type=None):
    query = BouncerBatch.select().where(BouncerBatch.status == ABANDONED)
    if check_type:
        query = query.where(BouncerBatch.check_type == check_type)
    return query.count()
