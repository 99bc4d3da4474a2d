"""The ledger of Bouncer batches: every state transition of `BouncerBatch`, in one place.

    reserved --confirm_sent--> outstanding --mark_completed (ingest)--> completed [--note_deleted]
        |                           '--fail_bouncer_batch--> failed (404, a refused finish)
        |--reject_reservation--> rejected (Bouncer refused the call)
        |                    '-> abandoned (the call went unanswered: a possible orphan)
        |--release_stale_reservations--> abandoned (the cycle died during the call: a possible orphan)
        |                            '-> (deleted: the cycle died before calling)
        '--cancel_reservation--> (deleted: never sent; no request budget left, or the call
                                  before it ended the cycle)

An outstanding batch may be marked to be finished at Bouncer (`want_finish`: past BATCH_TIMEOUT,
an operator, no live row left on it), which the status cycle then asks Bouncer to do
(`note_finish_accepted`); it stays outstanding, and in flight, until its download is ingested.
No row joins a batch marked so. A completed batch is deleted at Bouncer later, when asked
(`note_deleted`).

`note_calling` marks a reservation as sent (`sent_at`) in the transaction that takes the call's
request slot, before the call goes out, so a dead cycle's reservations tell which may be at
Bouncer and which never left.

A batch is reserved (ledger row, its addresses, its rows attached) in one transaction before
Bouncer is called, so whatever a dead cycle leaves behind is recoverable from these rows alone.
While a batch is reserved or outstanding it is *in flight*: its addresses sit in
`bouncer_batch_emails`, whose unique index refuses an address in two in-flight batches of a
check type, and the reservation counts the batches in flight under a per-check-type lock, so
the database itself holds BOUNCER_MAX_OUTSTANDING whatever the cycle locks do.
"""

import datetime
import logging
from dataclasses import dataclass

from peewee import SQL, fn

from bouncer.logs import ids
from bouncer.names import RESERVATION_LOCK
from bouncer.queue import fairness, line, packing, progress
from bouncer.states import IN_FLIGHT_STATES, BatchState, BouncerBatchState
from bouncer.store.bulk import among, insert_tuples
from bouncer.store.database import lock_rows_for_share, lock_rows_for_update, serialize_on, utcnow, write_transaction
from bouncer.store.models import BouncerBatch, BouncerBatchEmail, RidingRows, UserBatch

log = logging.getLogger(__name__)


# Attempts whose call failed: their rows go back in line.
FAILED_ATTEMPTS = (BouncerBatchState.REJECTED, BouncerBatchState.ABANDONED)
ABANDONED_REASON = "reservation abandoned: its cycle died during the call, before storing a Bouncer batch id"


@dataclass
class Reservation:
    ledger_id: int | None
    emails: list          # the addresses to send, oldest first
    cached: int = 0       # rows completed from a fresh verdict, no credit spent
    attached: int = 0     # rows joined to a batch already in flight
    no_slot: bool = False  # every slot was in flight: nothing was planned


def count_in_flight(check_type):
    """Reserved and outstanding Bouncer batches: what counts against BOUNCER_MAX_OUTSTANDING."""
    return (BouncerBatch.select()
            .where((BouncerBatch.check_type == check_type)
                   & BouncerBatch.status.in_(IN_FLIGHT_STATES))
            .count())


def count_outstanding(check_type):
    return (BouncerBatch.select(fn.COUNT(BouncerBatch.id))
            .where((BouncerBatch.check_type == check_type) & (BouncerBatch.status == BouncerBatchState.OUTSTANDING))
            .scalar())


def count_finishing(check_type):
    """Outstanding batches marked to be finished at Bouncer."""
    return BouncerBatch.select().where(outstanding(check_type) & BouncerBatch.finish_reason.is_null(False)).count()


def count_possible_orphans(check_type=None):
    query = BouncerBatch.select().where(BouncerBatch.status == BouncerBatchState.ABANDONED)
    if check_type:
        query = query.where(BouncerBatch.check_type == check_type)
    return query.count()


def batches_to_check(check_type):
    """Outstanding Bouncer batches, least recently checked first."""
    return list(BouncerBatch.select()
                .where((BouncerBatch.check_type == check_type)
                       & (BouncerBatch.status == BouncerBatchState.OUTSTANDING))
                .order_by(BouncerBatch.last_checked_at.asc(nulls="first"), BouncerBatch.id))


def outstanding(check_type=None):
    """Where clause: the outstanding batches (of `check_type`)."""
    where = BouncerBatch.status == BouncerBatchState.OUTSTANDING
    return where if check_type is None else where & (BouncerBatch.check_type == check_type)


def overdue_batches(check_type, sent_before):
    """Outstanding batches sent before `sent_before`, not yet to be finished."""
    return [ledger_id for (ledger_id,) in BouncerBatch.select(BouncerBatch.id).where(
        outstanding(check_type) & (BouncerBatch.sent_at < sent_before) & BouncerBatch.finish_reason.is_null()).tuples()]


def reserve_next_batch(check_type, batch_size, cache_days, max_outstanding, now=None, hold_within=None):
    """Reserve the next Bouncer batch: up to `batch_size` distinct stripped addresses, oldest
    pending first. Repeats of an address ride along; an address already in flight joins that
    batch; an address with a verdict younger than `cache_days` is completed from it; a row whose
    re-check is not yet due, or whose address is greylisted until at most `hold_within` ahead
    (a timedelta; None: never waited for), waits.

    Returns a Reservation (ledger_id None when nothing needs sending; `no_slot` when
    `max_outstanding` batches are in flight already), or None if the queue is empty."""
    now = now or utcnow()
    cutoff = now - datetime.timedelta(days=cache_days) if cache_days else None
    with write_transaction():
        # Every reservation of a check type waits here for the one before it to commit, so the
        # count below is the truth even with two cycles running at once (a lost cycle lock).
        serialize_on(RESERVATION_LOCK % check_type)
        if count_in_flight(check_type) >= max_outstanding:
            return Reservation(None, [], no_slot=True)
        plan = packing.plan_next_batch(check_type, batch_size, cutoff, now, hold_within)
        if plan.is_empty:
            return None
        # Locks in the order every writer takes them, so none waits for another that waits for
        # it: the Bouncer batches (as an ingest), then the user batches (as a cancel, an
        # admission), then their rows.
        live = lock_joinable(plan.attach)
        lock_batches_to_change(plan)
        attached = attach_to_in_flight(plan.attach, live, plan.span)
        progress.complete_rows_from_cache(plan.cached, now, plan.span)
        ledger_id = write_reservation(check_type, plan, now) if plan.send else None
        progress.mark_batches_processing(plan.touched_batches, ledger_id)
        progress.complete_finished_batches(plan.touched_batches, now)
    return Reservation(ledger_id, list(plan.send.values()), len(plan.cached), attached)


def lock_batches_to_change(plan):
    """Lock the user batches the reservation may change, before any of their rows: those of the
    rows it completes from a fresh verdict (they may end), and those still `queued` (they become
    `processing`). A batch already processing whose rows it only sends or attaches keeps rows
    pending, so it is not changed, nor locked: a loader or an admitter goes on admitting it
    meanwhile (measured, a 1M-row admission on PostgreSQL beside creation cycles: 58% of its
    speed alone when every claim locked it, 96% now)."""
    changing = UserBatch.status == BatchState.QUEUED
    if plan.cached_batches:
        changing |= among(UserBatch.id, sorted(plan.cached_batches))
    line.lock_batches(plan.user_batches, where=changing)


def lock_joinable(attach):
    """Of the in-flight batches rows are to join (`attach`: {ledger id: rows}), those that may
    take them, their ledger rows locked (FOR SHARE): a concurrent ingest either finished before
    (the batch is no longer in flight: the rows stay in line) or waits until these rows are
    attached; and so does a concurrent `want_finish`: a batch marked to be finished takes no row."""
    if not attach:
        return set()
    return {batch_id for (batch_id,) in lock_rows_for_share(
        BouncerBatch.select(BouncerBatch.id).where(
            BouncerBatch.id.in_(list(attach)) & BouncerBatch.status.in_(IN_FLIGHT_STATES)
            & BouncerBatch.finish_reason.is_null())).tuples()}


def attach_to_in_flight(attach, live, span):
    """Join rows to the in-flight batch that already holds their address, if it is `live` (see
    lock_joinable). Returns how many joined."""
    return sum(line.send_rows(rows, ledger_id, span)
               for ledger_id, rows in attach.items() if ledger_id in live)


def write_reservation(check_type, plan, now):
    """The rows of the plan leave the line; the ledger row, its addresses (the unique index
    refuses an address already in flight), and those rows riding on it. Only what is still in
    line goes: PostgreSQL reads the line without waiting for a cancel under way, so rows a cancel
    took since are left out, and an address none of the rest needs is not sent (no credit for a
    cancelled row). Returns the ledger id, or None when nothing was left to send."""
    taken = line.leave_line([row_id for row_id, _ in plan.send_rows], plan.span)
    if len(taken) < len(plan.send_rows):
        plan.send_only(line.addresses_and_users(taken))
        if not plan.send:
            return None
    ledger = BouncerBatch.create(check_type=check_type, status=BouncerBatchState.RESERVED, quantity=len(plan.send),
                                 reserved_at=now, rechecks=len(plan.rechecked))
    insert_tuples(BouncerBatchEmail, ("bouncer_batch", "email_global", "check_type", "email_sent"),
                  [(ledger.id, global_id, check_type, email) for global_id, email in plan.send.items()])
    line.ride(ledger.id, plan.send_rows)
    fairness.record_shares(ledger.id, check_type, plan.shares, now)
    return ledger.id


def end_flight(ledger_id):
    """The batch is no longer in flight: its addresses may be sent again."""
    BouncerBatchEmail.delete().where(BouncerBatchEmail.bouncer_batch == ledger_id).execute()


def cancel_reservation(ledger_id):
    """Undo a reservation that was never sent (no request budget left, the call before it ended
    the cycle, or its cycle died before calling): its emails are queued again where they were,
    and the ledger keeps no trace of it."""
    with write_transaction():
        progress.cancel_unwanted_rows(line.unsend_rows(ledger_id)[1], utcnow())
        end_flight(ledger_id)
        fairness.forget_shares_of(ledger_id)
        BouncerBatch.delete().where((BouncerBatch.id == ledger_id)
                                    & (BouncerBatch.status == BouncerBatchState.RESERVED)).execute()


def note_calling(ledger_id, now=None):
    """The reservation's create is about to go out (inside the transaction that takes its request
    slot): if its cycle dies before storing Bouncer's id, it is a possible orphan. False when it
    is no longer waiting to be sent (released meanwhile): then it must not be sent."""
    return (BouncerBatch.update(sent_at=now or utcnow())
            .where((BouncerBatch.id == ledger_id) & (BouncerBatch.status == BouncerBatchState.RESERVED)
                   & BouncerBatch.sent_at.is_null())
            .execute()) == 1


def confirm_sent(ledger_id, bouncer_id, now=None):
    """Store Bouncer's id: from here on the batch is followed to the end. False when the
    reservation was abandoned meanwhile (this cycle outlived RESERVATION_TIMEOUT)."""
    with write_transaction():    # on SQLite, a writer's turn is asked for as write transactions ask
        updated = (BouncerBatch.update(status=BouncerBatchState.OUTSTANDING, bouncer_id=bouncer_id,
                                       sent_at=now or utcnow())
                   .where((BouncerBatch.id == ledger_id) & (BouncerBatch.status == BouncerBatchState.RESERVED))
                   .execute())
    return updated == 1


def note_unanswered(ledger_id, reason):
    """The create went unanswered; the reservation stays, waiting for Bouncer's callback."""
    with write_transaction():
        (BouncerBatch.update(failure_reason="create unanswered (%s); waiting for Bouncer's callback" % reason)
         .where((BouncerBatch.id == ledger_id) & (BouncerBatch.status == BouncerBatchState.RESERVED)).execute())


def recognise_from_callback(ledger_id, bouncer_id, now=None):
    """Bouncer's callback names a reservation and its batch. A reservation still waiting for its
    id (its create went unanswered) takes it and is followed from here: its emails are not sent
    again. One already abandoned keeps the id, as a confirmed orphan. Returns what happened:
    "followed", "orphan", or None (nothing to learn: already known, or no such reservation)."""
    with write_transaction():
        batch = BouncerBatch.get_or_none(BouncerBatch.id == ledger_id)
        if batch is None or batch.bouncer_id is not None \
                or BouncerBatch.select().where(BouncerBatch.bouncer_id == bouncer_id).exists():
            return None
        if batch.status == BouncerBatchState.RESERVED:
            confirm_sent(ledger_id, bouncer_id, now)
            BouncerBatch.update(failure_reason=None).where(BouncerBatch.id == ledger_id).execute()
            outcome = "followed"
        elif batch.status == BouncerBatchState.ABANDONED:
            BouncerBatch.update(bouncer_id=bouncer_id).where(BouncerBatch.id == ledger_id).execute()
            outcome = "orphan"
        else:
            return None
    log.warning("Bouncer batch %s recognised from its callback for reservation %s: %s", bouncer_id, ledger_id,
                "followed, its emails not sent again" if outcome == "followed" else "an orphan (its emails "
                "were sent again after RESERVATION_TIMEOUT)", extra=ids(ledger_id=ledger_id, bouncer_id=bouncer_id))
    return outcome


def reject_reservation(ledger_id, reason, possible_orphan=False, now=None):
    """The call failed. Its addresses leave flight now; its emails stay parked until
    `requeue_failed_attempts`, so this cycle does not send them again (they wait for the next
    one, keeping FIFO for everything else). Bouncer refused it: `rejected`. It went unanswered
    (a timeout), so Bouncer may have created it anyway: `abandoned`, counted as a possible
    orphan."""
    status = BouncerBatchState.ABANDONED if possible_orphan else BouncerBatchState.REJECTED
    with write_transaction():
        (BouncerBatch.update(status=status, failure_reason=reason, finished_at=now or utcnow())
         .where((BouncerBatch.id == ledger_id) & (BouncerBatch.status == BouncerBatchState.RESERVED)).execute())
        end_flight(ledger_id)


def requeue_failed_attempts(check_type):
    """Queue again the emails of rejected or abandoned attempts. Returns how many. Almost always
    there are none: that is found by a read, so the cycle takes no write lock for it (on SQLite
    it would wait for an ingest's transaction to end)."""
    dead = BouncerBatch.select(BouncerBatch.id).where(
        (BouncerBatch.check_type == check_type) & BouncerBatch.status.in_(FAILED_ATTEMPTS))
    if not line.any_riding_on(dead):
        return 0
    with write_transaction():
        back, unwanted = line.requeue_rows_of(dead)
        progress.cancel_unwanted_rows(unwanted, utcnow())
        return back


def release_stale_reservations(check_type, older_than):
    """Release the reservations that never got a Bouncer id by `older_than`: their cycle died.
    One whose call had gone out (`note_calling`) is abandoned: Bouncer may have accepted the
    batch (the process died between the call and the commit of its id), so it is logged as a
    possible orphan. One never called is cancelled: its emails go back in line where they were.
    Returns ([(ledger id, addresses)] abandoned, [(ledger id, addresses)] cancelled). When there
    is none (nearly always), a read says so and no write lock is taken."""
    query = BouncerBatch.select(BouncerBatch.id, BouncerBatch.quantity, BouncerBatch.sent_at).where(
        (BouncerBatch.check_type == check_type) & (BouncerBatch.status == BouncerBatchState.RESERVED)
        & (BouncerBatch.reserved_at < older_than))
    if not query.exists():
        return [], []
    abandoned, cancelled = [], []
    with write_transaction():
        for ledger_id, quantity, sent_at in list(query.tuples()):   # read whole: the loop deletes
            where = ids(ledger_id=ledger_id, check_type=check_type)
            if sent_at is None:
                cancel_reservation(ledger_id)
                cancelled.append((ledger_id, quantity))
                log.warning("Reservation %s (%s, %s addresses) released: its cycle died before calling "
                            "Bouncer; its emails are queued again where they were", ledger_id, check_type,
                            quantity, extra=where)
                continue
            (BouncerBatch.update(status=BouncerBatchState.ABANDONED, finished_at=utcnow(),
                                 failure_reason=ABANDONED_REASON)
             .where(BouncerBatch.id == ledger_id).execute())
            end_flight(ledger_id)
            abandoned.append((ledger_id, quantity))
            log.warning("Reservation %s (%s, %s addresses) abandoned: possible orphan batch at "
                        "Bouncer; its emails are queued again", ledger_id, check_type, quantity, extra=where)
    if abandoned:
        requeue_failed_attempts(check_type)
    return abandoned, cancelled


def note_checked(ledger_id, bouncer_status, completed_at=None, credits=None, now=None):
    """What Bouncer said of the batch; `completed_at` (naive UTC) and the `credits` it charged,
    when it says it completed."""
    changes = {BouncerBatch.last_checked_at: now or utcnow(), BouncerBatch.bouncer_status: str(bouncer_status)[:64]}
    if completed_at is not None:
        changes[BouncerBatch.bouncer_completed_at] = completed_at
    if credits is not None:
        changes[BouncerBatch.credits] = credits
    BouncerBatch.update(changes).where(BouncerBatch.id == ledger_id).execute()


# -- finishing at Bouncer --

def want_finish(ledger_id, reason, now=None):
    """Mark an outstanding batch to be finished at Bouncer, saying why: from here on no row joins
    it, and the status cycle asks Bouncer. False when it is not outstanding, or marked already."""
    return (BouncerBatch.update(finish_reason=reason[:500], finish_asked_at=now or utcnow())
            .where((BouncerBatch.id == ledger_id) & outstanding() & BouncerBatch.finish_reason.is_null())
            .execute()) == 1


def live_riders(ledger_id):
    """Rows riding on the batch whose user batch still wants them (no cancel asked for)."""
    return (RidingRows.select(SQL("1")).join(UserBatch, on=(UserBatch.id == RidingRows.batch_id))
            .where((RidingRows.bouncer_batch == ledger_id) & UserBatch.cancelled_at.is_null()))


def unwanted_batches(check_type):
    """Outstanding batches not yet to be finished on which no live row rides: every row riding
    on it belongs to a user batch whose cancel was asked for, or none rides any more (an erasure
    took them off). Nobody is waiting for what they verify."""
    return [ledger_id for (ledger_id,) in BouncerBatch.select(BouncerBatch.id).where(
        outstanding(check_type) & BouncerBatch.finish_reason.is_null()
        & ~fn.EXISTS(live_riders(BouncerBatch.id))).tuples()]


def finish_if_unwanted(ledger_id, reason, now=None):
    """`want_finish`, if no live row rides on the batch. Its ledger row is locked first, so a row
    being attached meanwhile either is attached before the look (and the batch is kept) or finds
    the batch marked (and stays in line)."""
    with write_transaction():
        if claim_outstanding(ledger_id) is None or live_riders(ledger_id).exists():
            return False
        return want_finish(ledger_id, reason, now)


def note_finish_accepted(ledger_id, now=None):
    """Bouncer took the finish (or was found no longer running): it is not asked again."""
    (BouncerBatch.update(finish_accepted_at=now or utcnow())
     .where((BouncerBatch.id == ledger_id) & BouncerBatch.finish_accepted_at.is_null()).execute())


def finishes_past(check_type, asked_before):
    """[(ledger id, finish reason)] of outstanding batches whose finish was asked before
    `asked_before` and that never completed."""
    return list(BouncerBatch.select(BouncerBatch.id, BouncerBatch.finish_reason).where(
        outstanding(check_type) & (BouncerBatch.finish_asked_at < asked_before)).tuples())


# -- deleting at Bouncer --

def batches_to_delete(check_type, limit):
    """Completed batches (their download committed) not yet deleted at Bouncer, oldest first."""
    return list(BouncerBatch.select().where(
        (BouncerBatch.check_type == check_type) & (BouncerBatch.status == BouncerBatchState.COMPLETED)
        & BouncerBatch.deleted_at.is_null() & BouncerBatch.bouncer_id.is_null(False))
        .order_by(BouncerBatch.id).limit(limit))


def note_deleted(ledger_id, now=None):
    BouncerBatch.update(deleted_at=now or utcnow()).where(BouncerBatch.id == ledger_id).execute()


def claim_outstanding(ledger_id):
    """The ledger row, locked, if it is still outstanding: who finishes a batch is decided here."""
    query = BouncerBatch.select().where(
        (BouncerBatch.id == ledger_id) & (BouncerBatch.status == BouncerBatchState.OUTSTANDING))
    return lock_rows_for_update(query).first()


def fail_bouncer_batch(ledger_id, reason, now=None):
    """Bouncer lost the batch or it never finished: its emails and every user batch with an
    email in it fail, with `reason`. Returns the number of emails failed (None if the batch was
    no longer outstanding)."""
    now = now or utcnow()
    with write_transaction():
        batch = claim_outstanding(ledger_id)
        if batch is None:
            return None
        user_batches = line.batches_riding_on(ledger_id)
        failed = progress.fail_sent_rows(ledger_id, reason, now)
        end_flight(ledger_id)
        line.stop_riding(ledger_id)
        (BouncerBatch.update(status=BouncerBatchState.FAILED, failure_reason=reason, finished_at=now)
         .where(BouncerBatch.id == ledger_id).execute())
        progress.fail_batches(user_batches, reason, now)
    log.error("Bouncer batch %s (%s) failed: %s; %s emails and %s user batches marked failed",
              batch.bouncer_id, ledger_id, reason, failed, len(user_batches),
              extra=ids(ledger_id=ledger_id, bouncer_id=batch.bouncer_id))
    return failed


def mark_completed(ledger_id, now, refunded=None):
    """outstanding -> completed, inside the ingest's transaction once every row riding on the
    batch has its verdict or its failure (or is back in line for a re-check): its addresses
    leave flight, no row rides on it. `refunded`: the credits a finish gave back."""
    end_flight(ledger_id)
    line.stop_riding(ledger_id)
    (BouncerBatch.update(status=BouncerBatchState.COMPLETED, finished_at=now, bouncer_status="completed",
                         refunded=refunded)
     .where(BouncerBatch.id == ledger_id).execute())

