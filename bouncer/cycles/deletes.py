"""Deleting batches at Bouncer (BOUNCER_DELETE_RESULTS): `DELETE .../{id}` removes a batch's
addresses and verdicts from Bouncer's side.

Only a batch whose download is committed (ledger state `completed`, set in the ingest's own
transaction) is ever deleted, by the last step of a status cycle, so a death anywhere before
leaves the batch at Bouncer to be downloaded again. A delete that fails (Bouncer answers 405 while
a batch still runs, a 5xx, a timeout) is left for a later cycle; a 404 means it is gone already,
which is what was asked. A few at a time, after the checks and ingests: deletes never hold up an
ingest, and an operator turning the setting on for a long history spends the request budget on
it gradually.
"""

import logging

from bouncer.errors import BouncerError
from bouncer.logs import ids
from bouncer.queue import ledger
from bouncer.queue.ratelimit import take_request_slot

log = logging.getLogger(__name__)


DELETES_PER_CYCLE = 15


def delete_ingested(cycle):
    """Delete at Bouncer, when the settings ask for it, up to DELETES_PER_CYCLE completed batches."""
    if not cycle.settings.delete_results:
        return
    for batch in ledger.batches_to_delete(cycle.check_type, DELETES_PER_CYCLE):
        if cycle.must_stop():
            return
        if not take_request_slot("delete", cycle.settings.rate_limit_buffer, batch.check_type):
            cycle.report.stopped = "request budget used up before a delete"
            return
        if not delete_one(cycle, batch):
            return


def delete_one(cycle, batch):
    """Delete one batch at Bouncer and note it. False when the cycle must stop."""
    where = ids(ledger_id=batch.id, bouncer_id=batch.bouncer_id, check_type=batch.check_type)
    try:
        deleted = cycle.app.client.delete_batch(batch.check_type, batch.bouncer_id)
    except BouncerError as exc:
        if exc.is_not_deletable_yet:
            log.info("Bouncer batch %s (%s) cannot be deleted yet; next cycle", batch.bouncer_id, batch.id,
                     extra=where)
            return True
        cycle.report.errors += 1
        log.warning("Bouncer batch %s (%s) not deleted: %s; next cycle", batch.bouncer_id, batch.id, exc,
                    extra=where)
        if exc.ends_cycle:
            cycle.report.stopped = str(exc)
            cycle.report.refused = (exc.status, str(exc))
        return not exc.ends_cycle
    ledger.note_deleted(batch.id)
    cycle.report.deleted += 1
    log.info("Bouncer batch %s (%s) %s at Bouncer", batch.bouncer_id, batch.id,
             "deleted" if deleted else "was gone already", extra=where)
    return True
