"""The creation cycle: greedily pack the oldest pending emails into Bouncer batches.

Steps, each recoverable if the process dies right after it:
0. admit what is new (host-written rows, late rows): a bounded amount, so a million rows never
   hold a cycle for long; when more is left the cycle asks to run again at once;
1. recover: queue again the emails of rejected attempts; abandon reservations older than
   RESERVATION_TIMEOUT (their cycle died; possible orphans at Bouncer, logged and counted);
   while creation is paused (an operator; or out of credits, when the balance is asked for at
   most once a minute and creation resumes by itself), the cycle ends here;
2. capacity = BOUNCER_MAX_OUTSTANDING - batches in flight;
3. per free slot: reserve the next batch (ledger row and emails attached, committed; the
   database refuses a reservation beyond the cap), take a request slot of the rate limit (none
   left: the reservation is cancelled, the cycle ends), call Bouncer, store its batch id;
4. a failed call rejects its reservation; its emails wait for the next cycle. 429, 402 and 401
   end the cycle.
The cycle also ends between two slots when it must stop (a lost lock, a shutdown request).
Steps 0 and 1 find by reads when they have nothing to do (nearly always), so the first write
lock a cycle takes is its first reservation's: on SQLite each one waits for an ingest's
transaction to end, and a refill used to wait for four of them before it sent anything.
"""
import datetime
import logging
import time

from . import intake, ledger, pauses
from .db import utcnow
from .errors import BouncerError
from .logs import ids
from .ratelimit import forget_old_requests, take_request_slot

log = logging.getLogger(__name__)

# Admission's share of a creation cycle: its slices are short transactions, and past this the
# cycle packs what it has and runs again at once for the rest.
ADMISSION_BUDGET = 1.0


def create_batches(cycle, now=None):
    settings, check_type, report = cycle.settings, cycle.check_type, cycle.report
    now = now or utcnow()
    admit_new_rows(cycle, now)
    forget_old_requests(now)
    report.requeued = ledger.requeue_rejected_emails(check_type)
    report.abandoned = ledger.release_stale_reservations(
        check_type, now - datetime.timedelta(seconds=settings.reservation_timeout))
    if is_paused(cycle, now):
        return
    report.free_slots = max(0, settings.max_outstanding - ledger.count_in_flight(check_type))
    try:
        fill_free_slots(cycle)
    finally:
        # Emails of calls that failed in this cycle are queued again for the next one.
        ledger.requeue_rejected_emails(check_type)


def admit_new_rows(cycle, now):
    admission = intake.admit(cycle.check_type, deadline=time.monotonic() + ADMISSION_BUDGET, now=now,
                             should_stop=cycle.stop_reason)
    cycle.report.admission = admission
    if admission.unfinished:
        cycle.run_again()


def is_paused(cycle, now):
    """True (and said in the report) while creation is paused for this check type."""
    if pauses.credits_check_due(cycle.check_type, now):
        check_credits(cycle, now)
    paused = pauses.pause_of(cycle.check_type)
    if paused is not None:
        cycle.report.stopped = "paused: %s" % paused.reason
    return paused is not None


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


def fill_free_slots(cycle):
    settings, check_type, report = cycle.settings, cycle.check_type, cycle.report
    attempts = 0
    while attempts < report.free_slots:
        report.stopped = cycle.stop_reason()
        if report.stopped:
            return
        reservation = ledger.reserve_next_batch(check_type, settings.batch_size,
                                                settings.result_cache_days, settings.max_outstanding)
        if reservation is None or reservation.no_slot:
            return
        report.cached += reservation.cached
        report.attached += reservation.attached
        if reservation.ledger_id is None:
            continue  # only cached verdicts and repeats this round: nothing to send
        # The request slot is taken last, right before the call, so that the time recorded is
        # the time Bouncer sees (within the limiter's transit margin).
        if not take_request_slot("create", settings.rate_limit_buffer, check_type):
            ledger.cancel_reservation(reservation.ledger_id)
            report.stopped = "request budget used up (%d in 60 s)" % settings.rate_limit_buffer
            return
        attempts += 1
        if not send_reservation(cycle, reservation):
            return


def send_reservation(cycle, reservation):
    """Call Bouncer for one reservation. False when the cycle must stop."""
    app, check_type, report = cycle.app, cycle.check_type, cycle.report
    ledger_id = reservation.ledger_id
    try:
        answer = app.client.create_batch(check_type, reservation.emails,
                                         callback_url=app.callback_url(check_type, reservation=ledger_id))
    except BouncerError as exc:
        return call_failed(cycle, reservation, exc)
    bouncer_id = answer["batchId"]
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
    return True


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
