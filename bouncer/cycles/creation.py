"""The creation cycle: greedily pack the oldest pending emails into Bouncer batches.

Steps, each recoverable if the process dies right after it:
0. admit what is new (host-written rows, late rows): a bounded amount, so a million rows never
   hold a cycle for long; when more is left the cycle asks to run again at once;
1. recover: queue again the emails of rejected attempts; abandon reservations older than
   RESERVATION_TIMEOUT (their cycle died; possible orphans at Bouncer, logged and counted);
   order the line by QUEUE_POLICY and the users' weights when it is not (a policy switched, a
   weight changed: what is still in line takes new turns, in one transaction);
   while creation is paused (an operator; or out of credits, when the balance is asked for at
   most once a minute and creation resumes by itself), the cycle ends here;
2. capacity = BOUNCER_MAX_OUTSTANDING - batches in flight;
3. per free slot: reserve the next batch (ledger row and emails attached, committed; the
   database refuses a reservation beyond the cap); take a request slot of the rate limit and
   mark the reservation as sent, in one transaction (no slot left: the reservation is
   cancelled, the cycle ends); call Bouncer; store its batch id;
4. a failed call rejects its reservation; its emails wait for the next cycle. 429, 402 and 401
   end the cycle.
Each call runs on a thread of its own while the cycle reserves the next batch; it is answered
(its id stored, or its failure handled) before the next call goes out, so one call at most is
ever under way. A reservation made while the call before it ended the cycle is cancelled. A
dead cycle leaves at most one reservation marked as sent without an id (the possible orphan)
and one never called, which the next cycles tell apart (step 1).
The cycle also ends between two slots when it must stop (a lost lock, a shutdown request).
Steps 0 and 1 find by reads when they have nothing to do (nearly always), so the first write
lock a cycle takes is its first reservation's: on SQLite each one waits for an ingest's
transaction to end, and a refill used to wait for four of them before it sent anything.
"""

import datetime
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from bouncer.doors import admission
from bouncer.errors import BouncerError
from bouncer.logs import ids
from bouncer.queue import fairness, ledger, pauses
from bouncer.queue.ratelimit import forget_old_requests, take_request_slot
from bouncer.store.database import utcnow, write_transaction

log = logging.getLogger(__name__)


# Admission's share of a creation cycle: its slices are short transactions, and past this the
# cycle packs what it has and runs again at once for the rest.
ADMISSION_BUDGET = 1.0
NOT_SENDING = "not sending: BOUNCER_API_KEY is not set"


def create_batches(cycle, now=None):
    settings, check_type, report = cycle.settings, cycle.check_type, cycle.report
    now = now or utcnow()
    admit_new_rows(cycle, now)
    forget_old_requests(now)
    fairness.forget_old_shares(now)
    report.requeued = ledger.requeue_failed_attempts(check_type)
    report.abandoned, report.released = ledger.release_stale_reservations(
        check_type, now - datetime.timedelta(seconds=settings.reservation_timeout))
    report.reordered = fairness.order_line(check_type, settings.queue_policy)
    if is_paused(cycle, now) or has_no_key(cycle):
        return
    report.free_slots = max(0, settings.max_outstanding - ledger.count_in_flight(check_type))
    try:
        fill_free_slots(cycle)
    finally:
        # Emails of calls that failed in this cycle are queued again for the next one.
        ledger.requeue_failed_attempts(check_type)


def admit_new_rows(cycle, now):
    report = admission.admit(cycle.check_type, deadline=time.monotonic() + ADMISSION_BUDGET, now=now,
                             should_stop=cycle.stop_reason)
    cycle.report.admission = report
    if report.unfinished:
        cycle.run_again()


def is_paused(cycle, now):
    """True (and said in the report) while creation is paused for this check type."""
    if pauses.credits_check_due(cycle.check_type, now):
        check_credits(cycle, now)
    paused = pauses.pause_of(cycle.check_type)
    if paused is not None:
        cycle.report.stopped = "paused: %s" % paused.reason
    return paused is not None


def has_no_key(cycle):
    """True (and said in the report) when there is no key for Bouncer's own API: nothing is sent."""
    if cycle.settings.keyless_for_bouncer:
        cycle.report.stopped = NOT_SENDING
    return cycle.settings.keyless_for_bouncer


def check_credits(cycle, now):
    """Ask Bouncer for the balance, inside the request budget."""
    if not take_request_slot("credits", cycle.settings.rate_limit_buffer, cycle.check_type):
        return
    try:
        balance = cycle.app.client.get_credits()
    except BouncerError as exc:
        log.warning("Bouncer credits not known (%s); asking again in a minute", exc)
        balance = 0
    pauses.credits_checked(balance, now)


def hold_window(settings):
    """How far ahead a greylisted address's `retryAfter` may lie and still be waited for; None
    when greylisted addresses are never tried again (UNKNOWN_RECHECKS=0)."""
    if not settings.unknown_rechecks:
        return None
    return datetime.timedelta(seconds=settings.unknown_recheck_max_delay)


def fill_free_slots(cycle):
    settings, check_type, report = cycle.settings, cycle.check_type, cycle.report
    attempts = 0
    with Calls(cycle) as calls:
        while attempts < report.free_slots:
            if cycle.must_stop():
                return
            reservation = ledger.reserve_next_batch(check_type, settings.batch_size, settings.result_cache_days,
                                                    settings.max_outstanding, hold_within=hold_window(settings))
            # The call before this reservation was answered meanwhile; a reservation that is not
            # to be sent (that answer, a lost lock or a shutdown request ends the cycle) is undone.
            if not calls.answer() or cycle.must_stop():
                if reservation is not None and reservation.ledger_id is not None:
                    ledger.cancel_reservation(reservation.ledger_id)
                return
            if reservation is None or reservation.no_slot:
                return
            report.cached += reservation.cached
            report.attached += reservation.attached
            if reservation.ledger_id is None:
                if not (reservation.cached or reservation.attached):
                    return    # what the plan saw changed under it (a batch to finish took no row)
                continue  # only cached verdicts and repeats this round: nothing to send
            # The request slot is taken last, right before the call, so that the time recorded is
            # the time Bouncer sees (within the limiter's transit margin).
            if not take_call_slot(cycle, reservation.ledger_id):
                return
            attempts += 1
            calls.start(reservation)


def take_call_slot(cycle, ledger_id):
    """Take a request slot for the reservation's create and mark it as sent, in one transaction.
    False when it must not be sent and the cycle stops: no slot left (the reservation is
    cancelled), or it was released meanwhile (this cycle outlived RESERVATION_TIMEOUT)."""
    settings, report = cycle.settings, cycle.report
    with write_transaction():
        if not ledger.note_calling(ledger_id):
            report.stopped = "reservation %s was released before its call" % ledger_id
            return False
        if take_request_slot("create", settings.rate_limit_buffer, cycle.check_type):
            return True
        ledger.cancel_reservation(ledger_id)
    report.stopped = "request budget used up (%d in 60 s)" % settings.rate_limit_buffer
    return False


class Calls:
    """The cycle's create calls, one under way at most, each on a thread while the cycle reserves
    the next batch. `answer` waits for the one under way and stores what Bouncer said."""

    def __init__(self, cycle):
        self.cycle, self.under_way = cycle, None

    def __enter__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="create")
        return self

    def __exit__(self, *exc):
        try:
            self.answer()   # a call already made has its id stored before the cycle ends
        finally:
            self.pool.shutdown(wait=True)

    def start(self, reservation):
        app, check_type = self.cycle.app, self.cycle.check_type
        callback_url = app.callback_url(check_type, reservation=reservation.ledger_id)
        self.under_way = (reservation, self.pool.submit(app.client.create_batch, check_type,
                                                        reservation.emails, callback_url=callback_url))

    def answer(self):
        """Act on the answer of the call under way, if any. False when the cycle must stop."""
        if self.under_way is None:
            return True
        reservation, call = self.under_way
        self.under_way = None
        try:
            answer = call.result()
        except BouncerError as exc:
            return call_failed(self.cycle, reservation, exc)
        store_batch_id(self.cycle, reservation, answer["batchId"])
        return True


def store_batch_id(cycle, reservation, bouncer_id):
    check_type, report, ledger_id = cycle.check_type, cycle.report, reservation.ledger_id
    if ledger.confirm_sent(ledger_id, bouncer_id):
        report.created.append((ledger_id, bouncer_id, len(reservation.emails)))
        log.info("Bouncer batch %s created for reservation %s (%s, %d addresses)",
                 bouncer_id, ledger_id, check_type, len(reservation.emails),
                 extra=ids(ledger_id=ledger_id, bouncer_id=bouncer_id, check_type=check_type))
    else:
        log.error("Bouncer batch %s was created after reservation %s had been abandoned: orphan "
                  "batch at Bouncer (%d addresses); its emails were queued again",
                  bouncer_id, ledger_id, len(reservation.emails),
                  extra=ids(ledger_id=ledger_id, bouncer_id=bouncer_id, check_type=check_type))


def call_failed(cycle, reservation, exc):
    check_type, report, ledger_id = cycle.check_type, cycle.report, reservation.ledger_id
    report.failed_calls.append((ledger_id, str(exc)))
    where = ids(ledger_id=ledger_id, check_type=check_type)
    if exc.timed_out and cycle.app.callback_url(check_type) is not None:
        # Bouncer may have created the batch: its callback names this reservation, and then it
        # is followed instead of sent again. Until then (at most RESERVATION_TIMEOUT) the
        # reservation holds its slot and its addresses.
        ledger.note_unanswered(ledger_id, str(exc))
        log.warning("Reservation %s: Bouncer did not answer in time; it may have created the batch "
                    "anyway; waiting for its callback before sending these %d addresses again", ledger_id,
                    len(reservation.emails), extra=where)
    else:
        ledger.reject_reservation(ledger_id, str(exc), possible_orphan=exc.timed_out)
        if exc.timed_out:
            log.warning("Reservation %s: Bouncer did not answer in time; it may have created the "
                        "batch anyway (possible orphan, %d addresses)", ledger_id,
                        len(reservation.emails), extra=where)
    if exc.is_out_of_credits:
        pauses.pause_for_credits(str(exc))
    if exc.ends_cycle:
        report.stopped = str(exc)
        report.refused = (exc.status, str(exc))
        log.error("Creation cycle %s stopped: %s", check_type, exc, extra=where)
        return False
    log.warning("Reservation %s not sent, its emails wait for the next cycle: %s", ledger_id, exc,
                extra=where)
    return True

