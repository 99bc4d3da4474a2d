"""The status cycle: follow every outstanding Bouncer batch; ingest the completed ones at once.

Steps, each recoverable if the process dies right after it:
1. mark the batches to finish at Bouncer: outstanding longer than BATCH_TIMEOUT, or carrying
   only rows whose user batch was cancelled; fail those asked to finish long ago that never
   completed (finishing.py);
2. per outstanding batch, least recently checked first (but a batch Bouncer's callback named
   goes next, and one named after this cycle found it still waiting is checked once more),
   each call after a rate-limit slot:
   status -> `completed`: download and ingest in one transaction (a death mid-ingest rolls back
   and the next cycle downloads again); 404: fail the batch; `queued`/`processing`: wait, but
   first ask Bouncer to finish it when it is marked so; an undocumented status: log it and wait
   (BATCH_TIMEOUT bounds the wait);
3. 405 on download waits for the next cycle; 5xx and timeouts skip to the next batch; 429, 402
   and 401 end the cycle;
4. with BOUNCER_DELETE_RESULTS, delete a few completed batches at Bouncer (deletes.py).
The cycle also ends between two batches when it must stop (a lost lock, a shutdown request).

A large download (APART_FROM addresses or more) is fetched and read into its columns by a
process of its own, forked when its batch is found completed, while the cycle ingests the batch
before it: one ahead at most. The reading is Python work, so a thread would take turns with the
ingest at Python's lock; a process runs beside it on another core and sends back what it read
(measured on 150k results: pickling and unpickling a download costs about a fifth of reading
it). Batches are still ingested one at a time, in the order they were checked; after a check
that started no download, one that has arrived is ingested at once rather than after the checks
of the batches still at Bouncer; and one already fetched when the cycle must stop is still
ingested. A small download is fetched by the cycle itself when its batch is checked. A process
that ends without an answer (killed, say) is a failed download: its batch waits for the next
cycle.
"""

import logging
from collections import OrderedDict

from bouncer.cycles import deletes, finishing, ingest
from bouncer.cycles.downloads import Downloads
from bouncer.errors import BouncerError
from bouncer.logs import ids
from bouncer.queue import ledger
from bouncer.queue.ratelimit import take_request_slot
from bouncer.store.database import utcnow

log = logging.getLogger(__name__)


WAITING_STATUSES = ("queued", "processing")


def check_batches(cycle, now=None):
    now = now or utcnow()
    finishing.decide_finishes(cycle, now)
    follow_outstanding(cycle)
    if cycle.report.stopped is None:
        deletes.delete_ingested(cycle)


def follow_outstanding(cycle):
    """Step 2: check every outstanding batch, ingesting the completed ones."""
    settings, check_type, report = cycle.settings, cycle.check_type, cycle.report
    turns = Turns(cycle, ledger.batches_to_check(check_type))
    with Downloads(cycle.app.client) as downloads:
        for batch in turns:
            if cycle.must_stop():
                break
            if not take_request_slot("status", settings.rate_limit_buffer, check_type):
                report.stopped = "request budget used up (%d in 60 s)" % settings.rate_limit_buffer
                break
            started = downloads.started
            if not follow_batch(cycle, batch, downloads, turns):
                break
            while downloads.ingest_due(started_one=downloads.started > started):
                if not ingest_next(cycle, downloads):
                    return
        # Whatever ended the checks, a download already asked for is ingested: its request is
        # spent, and its batch's slot is freed now rather than a cycle later (one at most).
        while downloads:
            if not ingest_next(cycle, downloads):
                return


class Turns:
    """The outstanding batches in the order this cycle checks them: least recently checked
    first, except that before each check the batches Bouncer's callback named since the last
    one go to the front. The callback names the batch that completed, so its slot is freed
    without waiting for the checks of those still running. A batch named after this cycle
    found it waiting (it completed since) is checked once more, in this cycle, rather than in
    the run again the callback also asks for. A name that is no outstanding batch of this
    cycle's is dropped: it costs no request."""

    def __init__(self, cycle, batches):
        self.cycle = cycle
        self.unchecked = OrderedDict((batch.id, batch) for batch in batches)
        self.waiting = {}   # checked in this cycle and still running at Bouncer

    def __iter__(self):
        while True:
            for ledger_id in self.cycle.called_back():
                batch = self.unchecked.get(ledger_id)
                if batch is None and ledger_id in self.waiting:
                    batch = self.waiting.pop(ledger_id)
                    self.cycle.report.waiting -= 1   # counted once, by its last check
                if batch is not None:
                    self.unchecked[ledger_id] = batch
                    self.unchecked.move_to_end(ledger_id, last=False)
            if not self.unchecked:
                return
            yield self.unchecked.popitem(last=False)[1]

    def still_running(self, batch):
        self.waiting[batch.id] = batch


def follow_batch(cycle, batch, downloads, turns):
    """Check one batch and act on its status (a completed one's download is started). False
    when the cycle must stop."""
    try:
        answer = cycle.app.client.get_batch(batch.check_type, batch.bouncer_id)
    except BouncerError as exc:
        return call_failed(cycle, batch, exc)
    cycle.report.checked += 1
    status = answer.get("status")
    ledger.note_checked(batch.id, status, completed_at=ingest.parse_time(answer.get("completed")),
                        credits=credits_of(answer))
    # Documented: queued, processing, completed. Read leniently (case, spaces).
    status = status.strip().lower() if isinstance(status, str) else status
    if status == "completed":
        if not take_request_slot("download", cycle.settings.rate_limit_buffer, batch.check_type):
            cycle.report.stopped = "request budget used up before a download"
            return False
        downloads.start(batch)
        return True
    if finishing.is_to_ask(batch):
        try:
            asked = finishing.ask_bouncer(cycle, batch, status)
        except BouncerError as exc:
            return call_failed(cycle, batch, exc)
        if asked != finishing.ASKED:
            return asked == finishing.FAILED
    if status not in WAITING_STATUSES:
        log.warning("Bouncer batch %s (%s) has status %r, which Bouncer does not document; "
                    "checking again next cycle", batch.bouncer_id, batch.id, status,
                    extra=ids(ledger_id=batch.id, bouncer_id=batch.bouncer_id))
    else:
        turns.still_running(batch)
    cycle.report.waiting += 1
    return True


def credits_of(answer):
    """The credits Bouncer says the batch cost (given once it completed), or None."""
    credits = answer.get("credits")
    return credits if isinstance(credits, int) and not isinstance(credits, bool) and credits >= 0 else None


def ingest_next(cycle, downloads):
    """Ingest the oldest download under way, once it has arrived. False when the cycle must stop."""
    batch, fetch = downloads.next()
    try:
        download = fetch.result()
    except BouncerError as exc:
        if exc.is_results_gone:
            return fail_for_good(cycle, batch, "Bouncer removed the results of batch %s: %s"
                                 % (batch.bouncer_id, exc))
        if exc.is_not_ready:
            log.info("Bouncer batch %s (%s) is not downloadable yet; next cycle", batch.bouncer_id,
                     batch.id, extra=ids(ledger_id=batch.id, bouncer_id=batch.bouncer_id))
            cycle.report.waiting += 1
            return True
        return call_failed(cycle, batch, exc)
    settings = cycle.settings
    result = ingest.ingest_download(batch.id, download,
                                    rechecks=ingest.Rechecks(settings.unknown_rechecks,
                                                             settings.unknown_recheck_max_delay))
    if result is not None:
        cycle.report.ingested.append(result)
        cycle.slot_freed()
    return True


def fail_for_good(cycle, batch, reason):
    """Bouncer will never give this batch's results: it fails with its emails and user batches."""
    finishing.fail(cycle, batch.id, reason)
    return True


def call_failed(cycle, batch, exc):
    where = ids(ledger_id=batch.id, bouncer_id=batch.bouncer_id, check_type=batch.check_type)
    if exc.is_not_found:
        return fail_for_good(cycle, batch, "Bouncer no longer knows batch %s (404)" % batch.bouncer_id)
    cycle.report.errors += 1
    if exc.ends_cycle:
        cycle.report.stopped = str(exc)
        cycle.report.refused = (exc.status, str(exc))
        log.error("Status cycle %s stopped: %s", batch.check_type, exc, extra=where)
        return False
    log.warning("Bouncer batch %s (%s) not checked: %s; next cycle", batch.bouncer_id, batch.id, exc,
                extra=where)
    return True

