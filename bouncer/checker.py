"""The status cycle: follow every outstanding Bouncer batch; ingest the completed ones at once.

Steps, each recoverable if the process dies right after it:
1. fail batches outstanding longer than BATCH_TIMEOUT (with their emails and user batches);
2. per outstanding batch, least recently checked first, each call after a rate-limit slot:
   status -> `completed`: download and ingest in one transaction (a death mid-ingest rolls back
   and the next cycle downloads again); 404: fail the batch; `queued`/`processing`: wait;
   an undocumented status: log it and wait (BATCH_TIMEOUT bounds the wait);
3. 405 on download waits for the next cycle; 5xx and timeouts skip to the next batch; 429, 402
   and 401 end the cycle.
"""
import datetime
import logging
from dataclasses import dataclass, field

from .client import BouncerError
from .db import utcnow
from .ingest import (
    batches_to_check, fail_bouncer_batch, ingest_results, note_checked, overdue_batches,
)
from .locks import run_exclusively
from .ratelimit import take_request_slot

log = logging.getLogger(__name__)

WAITING_STATUSES = ("queued", "processing")


@dataclass
class StatusReport:
    check_type: str
    skipped: bool = False
    checked: int = 0
    ingested: list = field(default_factory=list)   # IngestReport per completed batch
    failed: list = field(default_factory=list)     # (ledger id, reason)
    waiting: int = 0
    errors: int = 0
    stopped: str | None = None
    seconds: float = 0.0
    on_slot_freed: object = field(default=None, repr=False)   # called when a batch ends

    def slot_freed(self):
        if self.on_slot_freed is not None:
            self.on_slot_freed()

    def summary(self):
        if self.skipped:
            return "%s: another status cycle is running; nothing done" % self.check_type
        parts = ["%s: %d Bouncer batch(es) checked, %d ingested (%d emails verified), %d waiting" % (
            self.check_type, self.checked, len(self.ingested),
            sum(r.verified for r in self.ingested), self.waiting)]
        if self.failed:
            parts.append("%d failed" % len(self.failed))
        if self.errors:
            parts.append("%d call(s) failed, retried next cycle" % self.errors)
        if self.stopped:
            parts.append("stopped: %s" % self.stopped)
        return "; ".join(parts)


def run_status_cycle(app, check_type, now=None, on_slot_freed=None):
    """One status cycle for `check_type`, unless one is already running anywhere.
    `on_slot_freed()` is called each time a batch ends (the jobs refill the slot at once)."""
    report = StatusReport(check_type, on_slot_freed=on_slot_freed)
    return run_exclusively(app, "checker", "Status", report, check_batches, now)


def check_batches(app, check_type, report, now=None):
    settings = app.settings
    now = now or utcnow()
    fail_overdue(check_type, settings.batch_timeout, report, now)
    for ledger in batches_to_check(check_type):
        if not take_request_slot("status", settings.rate_limit_buffer, check_type):
            report.stopped = "request budget used up (%d in 60 s)" % settings.rate_limit_buffer
            return
        if not follow_batch(app, ledger, report):
            return


def fail_overdue(check_type, batch_timeout, report, now):
    sent_before = now - datetime.timedelta(seconds=batch_timeout)
    for ledger_id in overdue_batches(check_type, sent_before):
        reason = "Bouncer batch did not complete within BATCH_TIMEOUT (%d s)" % batch_timeout
        if fail_bouncer_batch(ledger_id, reason, now) is not None:
            report.failed.append((ledger_id, reason))
            report.slot_freed()


def follow_batch(app, ledger, report):
    """Check one batch and act on its status. False when the cycle must stop."""
    try:
        answer = app.client.get_batch(ledger.check_type, ledger.bouncer_id)
    except BouncerError as exc:
        return handle_call_error(ledger, exc, report)
    report.checked += 1
    status = answer.get("status")
    note_checked(ledger.id, status)
    if status == "completed":
        return download_and_ingest(app, ledger, report)
    if status not in WAITING_STATUSES:
        log.warning("Bouncer batch %s (%s) has status %r, which Bouncer does not document; "
                    "checking again next cycle", ledger.bouncer_id, ledger.id, status)
    report.waiting += 1
    return True


def download_and_ingest(app, ledger, report):
    if not take_request_slot("download", app.settings.rate_limit_buffer, ledger.check_type):
        report.stopped = "request budget used up before a download"
        return False
    try:
        records = app.client.download_batch(ledger.check_type, ledger.bouncer_id)
    except BouncerError as exc:
        if exc.is_not_ready:
            log.info("Bouncer batch %s (%s) is not downloadable yet; next cycle", ledger.bouncer_id, ledger.id)
            report.waiting += 1
            return True
        return handle_call_error(ledger, exc, report)
    result = ingest_results(ledger.id, records)
    if result is not None:
        report.ingested.append(result)
        report.slot_freed()
    return True


def handle_call_error(ledger, exc, report):
    if exc.is_not_found:
        reason = "Bouncer no longer knows batch %s (404)" % ledger.bouncer_id
        if fail_bouncer_batch(ledger.id, reason) is not None:
            report.failed.append((ledger.id, reason))
            report.slot_freed()
        return True
    report.errors += 1
    if exc.ends_cycle:
        report.stopped = str(exc)
        log.error("Status cycle %s stopped: %s", ledger.check_type, exc)
        return False
    log.warning("Bouncer batch %s (%s) not checked: %s; next cycle", ledger.bouncer_id, ledger.id, exc)
    return True
