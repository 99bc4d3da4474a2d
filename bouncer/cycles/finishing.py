"""Finishing Bouncer batches: `POST .../{id}/finish` stops a running batch at Bouncer, refunds
the credits of what it had not verified, and lets the verified part be downloaded.

A batch is to be finished when it is past BATCH_TIMEOUT, when an operator asks (the console), or
when no live row rides on it any more (every row on it belongs to a user batch whose cancel was
asked for). That wish is written to the ledger first (`ledger.want_finish`), so a death after it
loses nothing; from then on no row joins the batch. The status cycle asks Bouncer right after a
check that found the batch still running; once Bouncer says `completed`, the download is
ingested like any other, and the addresses missing from it end with a reason saying the batch
was finished before they were verified (rows whose cancel was asked for end `cancelled`).

Bouncer may refuse. 404 (it no longer knows the batch) fails it, as a status 404 does. 400 ("has
to be running to finish") fails it too when the check just found it still `queued`, as before;
a batch found running a moment ago has completed, or is finishing, since: it is followed to its
download. A batch asked to finish FINISH_GRACE ago that never completed (Bouncer did not answer,
or never got there) fails as before.
"""

import datetime
import logging

from bouncer.errors import BouncerError
from bouncer.logs import ids
from bouncer.queue import ledger
from bouncer.queue.ratelimit import take_request_slot

log = logging.getLogger(__name__)


FINISH_GRACE = 3600   # seconds a batch has to complete once its finish was asked for
OVERDUE = "Bouncer batch did not complete within BATCH_TIMEOUT (%d s)"
UNWANTED = "every row on it was cancelled"
# What `ask_bouncer` made of the batch: asked (or found finishing), failed, or the cycle stops.
ASKED, FAILED, STOP = "asked", "failed", "stop"


def decide_finishes(cycle, now):
    """Mark the batches to finish (past BATCH_TIMEOUT; wanted by nobody) and fail those asked
    to finish FINISH_GRACE ago that never completed. Only the ledger is touched."""
    check_type, timeout = cycle.check_type, cycle.settings.batch_timeout
    for ledger_id in ledger.overdue_batches(check_type, now - datetime.timedelta(seconds=timeout)):
        if ledger.want_finish(ledger_id, OVERDUE % timeout, now):
            log.warning("Bouncer batch %s is past BATCH_TIMEOUT: finishing it at Bouncer", ledger_id,
                        extra=ids(ledger_id=ledger_id, check_type=check_type))
    for ledger_id in ledger.unwanted_batches(check_type):
        if ledger.finish_if_unwanted(ledger_id, UNWANTED, now):
            log.info("Bouncer batch %s carries only cancelled rows: finishing it at Bouncer", ledger_id,
                     extra=ids(ledger_id=ledger_id, check_type=check_type))
    asked_before = now - datetime.timedelta(seconds=FINISH_GRACE)
    for ledger_id, reason in ledger.finishes_past(check_type, asked_before):
        fail(cycle, ledger_id, "%s; it did not complete within %d s of being finished" % (reason, FINISH_GRACE),
             now)


def is_to_ask(batch):
    """Whether Bouncer is still to be asked to finish this batch."""
    return batch.finish_reason is not None and batch.finish_accepted_at is None


def ask_bouncer(cycle, batch, status):
    """Ask Bouncer to finish `batch`, which a check just found `status` (not completed). Returns
    ASKED, FAILED (refused: the batch failed as before) or STOP (no request budget left). Any
    other failure of the call is raised (a BouncerError) for the caller to handle as any call's."""
    if not take_request_slot("finish", cycle.settings.rate_limit_buffer, batch.check_type):
        cycle.report.stopped = "request budget used up before a finish"
        return STOP
    where = ids(ledger_id=batch.id, bouncer_id=batch.bouncer_id)
    try:
        cycle.app.client.finish_batch(batch.check_type, batch.bouncer_id)
    except BouncerError as exc:
        if not exc.is_not_running:
            raise
        if status == "queued":
            fail(cycle, batch.id, "%s; Bouncer refused to finish it: %s" % (batch.finish_reason, exc))
            return FAILED
        log.info("Bouncer batch %s (%s) is no longer running: completed or finishing since its check",
                 batch.bouncer_id, batch.id, extra=where)
    ledger.note_finish_accepted(batch.id)
    cycle.report.finishing.append(batch.id)
    log.warning("Bouncer batch %s (%s) finished at Bouncer (%s): its verified part will be ingested, the rest "
                "refunded", batch.bouncer_id, batch.id, batch.finish_reason, extra=where)
    return ASKED


def fail(cycle, ledger_id, reason, now=None):
    """Fail the batch as before a finish existed (its rows and user batches with it)."""
    if ledger.fail_bouncer_batch(ledger_id, reason, now) is not None:
        cycle.report.failed.append((ledger_id, reason))
        cycle.slot_freed()
