"""The creation cycle: greedily pack the oldest pending emails into Bouncer batches.

Steps, each recoverable if the process dies right after it:
1. recover: queue again the emails of rejected attempts; abandon reservations older than
   RESERVATION_TIMEOUT (their cycle died; possible orphans at Bouncer, logged and counted);
2. capacity = BOUNCER_MAX_OUTSTANDING - batches in flight;
3. per free slot: reserve the next batch (ledger row and emails attached, committed), take a
   request slot of the rate limit (none left: the reservation is cancelled, the cycle ends),
   call Bouncer, store its batch id;
4. a failed call rejects its reservation; its emails wait for the next cycle. 429, 402 and 401
   end the cycle.
"""
import datetime
import logging
from dataclasses import dataclass, field

from .client import BouncerError
from .db import utcnow
from .locks import run_exclusively
from .queue import (
    cancel_reservation, confirm_sent, count_in_flight_batches, has_queued_emails, reject_reservation,
    release_stale_reservations, requeue_rejected_emails, reserve_next_batch,
)
from .ratelimit import forget_old_requests, take_request_slot

log = logging.getLogger(__name__)


@dataclass
class CreationReport:
    check_type: str
    skipped: bool = False
    free_slots: int = 0
    created: list = field(default_factory=list)        # (ledger id, bouncer id, addresses)
    failed_calls: list = field(default_factory=list)   # (ledger id, reason)
    cached: int = 0
    attached: int = 0
    requeued: int = 0
    abandoned: list = field(default_factory=list)      # (ledger id, addresses): possible orphans
    stopped: str | None = None
    seconds: float = 0.0

    def summary(self):
        if self.skipped:
            return "%s: another creation cycle is running; nothing done" % self.check_type
        parts = ["%s: %d Bouncer batch(es) created (%d addresses)" % (
            self.check_type, len(self.created), sum(n for _, _, n in self.created))]
        if self.failed_calls:
            parts.append("%d call(s) failed, emails queued again" % len(self.failed_calls))
        if self.cached:
            parts.append("%d email(s) completed from cached verdicts" % self.cached)
        if self.attached:
            parts.append("%d email(s) joined batches in flight" % self.attached)
        if self.abandoned:
            parts.append("%d abandoned reservation(s) released (possible orphans)" % len(self.abandoned))
        parts.append("%d free slot(s) at start" % self.free_slots)
        if self.stopped:
            parts.append("stopped: %s" % self.stopped)
        return "; ".join(parts)


def run_creation_cycle(app, check_type, now=None):
    """One creation cycle for `check_type`, unless one is already running anywhere."""
    return run_exclusively(app, "creator", "Creation", CreationReport(check_type), create_batches, now)


def create_batches(app, check_type, report, now=None):
    settings = app.settings
    now = now or utcnow()
    forget_old_requests(now)
    report.requeued = requeue_rejected_emails(check_type)
    report.abandoned = release_stale_reservations(
        check_type, now - datetime.timedelta(seconds=settings.reservation_timeout))
    report.free_slots = max(0, settings.max_outstanding - count_in_flight_batches(check_type))
    try:
        fill_free_slots(app, check_type, report)
    finally:
        # Emails of calls that failed in this cycle are queued again for the next one.
        requeue_rejected_emails(check_type)


def fill_free_slots(app, check_type, report):
    settings = app.settings
    attempts = 0
    while attempts < report.free_slots and has_queued_emails(check_type):
        reservation = reserve_next_batch(check_type, settings.batch_size, settings.result_cache_days)
        if reservation is None:
            return
        report.cached += reservation.cached
        report.attached += reservation.attached
        if reservation.ledger_id is None:
            continue  # only cached verdicts and repeats this round: nothing to send
        # The request slot is taken last, right before the call, so that the time recorded is
        # the time Bouncer sees (within the limiter's transit margin).
        if not take_request_slot("create", settings.rate_limit_buffer, check_type):
            cancel_reservation(reservation.ledger_id)
            report.stopped = "request budget used up (%d in 60 s)" % settings.rate_limit_buffer
            return
        attempts += 1
        if not send_reservation(app, check_type, reservation, report):
            return


def send_reservation(app, check_type, reservation, report):
    """Call Bouncer for one reservation. False when the cycle must stop."""
    ledger_id = reservation.ledger_id
    try:
        answer = app.client.create_batch(check_type, reservation.emails,
                                         callback_url=app.callback_url(check_type))
    except BouncerError as exc:
        reject_reservation(ledger_id, str(exc), possible_orphan=exc.timed_out)
        report.failed_calls.append((ledger_id, str(exc)))
        if exc.timed_out:
            log.warning("Reservation %s: Bouncer did not answer in time; it may have created the "
                        "batch anyway (possible orphan, %d addresses)", ledger_id, len(reservation.emails))
        if exc.ends_cycle:
            report.stopped = str(exc)
            log.error("Creation cycle %s stopped: %s", check_type, exc)
            return False
        log.warning("Reservation %s not sent, its emails wait for the next cycle: %s", ledger_id, exc)
        return True
    bouncer_id = answer["batchId"]
    if confirm_sent(ledger_id, bouncer_id):
        report.created.append((ledger_id, bouncer_id, len(reservation.emails)))
        log.info("Bouncer batch %s created for reservation %s (%s, %d addresses)",
                 bouncer_id, ledger_id, check_type, len(reservation.emails))
    else:
        log.error("Bouncer batch %s was created after reservation %s had been abandoned: orphan "
                  "batch at Bouncer (%d addresses); its emails were queued again",
                  bouncer_id, ledger_id, len(reservation.emails))
    return True
