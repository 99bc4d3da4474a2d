"""Actions on user batches and Bouncer batches, for every door alike."""
import logging

from bouncer.cycles.triggers import run_now, trigger_webhook_sender
from bouncer.errors import NotFound
from bouncer.logs import ids
from bouncer.names import STATUS
from bouncer.queue import ledger, progress
from bouncer.queue.audit import audit
from bouncer.store.models import BouncerBatch, RidingRows, UserBatch

log = logging.getLogger(__name__)


def cancel_user_batch(app, batch_id, who=None):
    """Cancel a user batch (see progress.cancel_batch); an operator's cancel (`who`) is audited.
    Returns how many rows not yet sent were cancelled. NotFound, or Conflict for an ended one."""
    if not UserBatch.select().where(UserBatch.id == batch_id).exists():
        raise NotFound("no user batch with id %s" % batch_id)
    cancelled = progress.cancel_batch(batch_id)
    if who is not None:
        audit(who, "cancel", "user batch %d" % batch_id, "%d email(s) not yet sent cancelled" % cancelled)
        log.warning("User batch %s cancelled by the %s (%d emails not yet sent)", batch_id, who, cancelled,
                    extra=ids(user_batch_id=batch_id))
    tell_webhook_sender(app)
    if RidingRows.select().where(RidingRows.batch_id == batch_id).exists():
        # A Bouncer batch left carrying only cancelled rows is finished by the status cycle: now.
        tell_status_cycle(app, UserBatch.get_by_id(batch_id).check_type)
    return cancelled


def finish_bouncer_batch(app, ledger_id, reason, who):
    """An operator has a stuck Bouncer batch finished at Bouncer, saying why: the status cycle
    (run now) asks Bouncer; the part it verified is ingested, the rest refunded and its rows
    failed with `reason`; a finish Bouncer refuses fails the batch as before. Returns False when
    the batch is not outstanding or is being finished already. NotFound for an unknown id."""
    batch = BouncerBatch.get_or_none(BouncerBatch.id == ledger_id)
    if batch is None:
        raise NotFound("no Bouncer batch with id %s" % ledger_id)
    if not ledger.want_finish(ledger_id, reason):
        return False
    audit(who, "finish", "Bouncer batch %d" % ledger_id, reason)
    log.warning("Bouncer batch %s to be finished at Bouncer, asked by the %s: %s", ledger_id, who, reason,
                extra=ids(ledger_id=ledger_id))
    tell_status_cycle(app, batch.check_type)
    return True


def tell_status_cycle(app, check_type):
    """The status cycle runs now. Redis away: its schedule will run it."""
    try:
        run_now(app.redis, STATUS, check_type)
    except Exception as exc:
        log.warning("Cannot queue the status cycle now (%s); its schedule will", type(exc).__name__)


def tell_webhook_sender(app):
    """Batches that ended have their webhooks sent now. Redis away: the sender's schedule will."""
    try:
        trigger_webhook_sender(app.redis)
    except Exception as exc:
        log.warning("Cannot queue the webhook sender now (%s); its schedule will", type(exc).__name__)
