"""Actions on user batches and Bouncer batches, for every door alike."""
import logging

from bouncer.cycles.triggers import trigger_webhook_sender
from bouncer.errors import NotFound
from bouncer.logs import ids
from bouncer.queue import ledger, progress
from bouncer.queue.audit import audit
from bouncer.store.models import BouncerBatch, UserBatch

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
    return cancelled


def fail_bouncer_batch(app, ledger_id, reason, who):
    """An operator fails a stuck Bouncer batch, with `reason`: its rows and user batches fail.
    Returns the rows failed, None when it was not outstanding. NotFound for an unknown id."""
    if not BouncerBatch.select().where(BouncerBatch.id == ledger_id).exists():
        raise NotFound("no Bouncer batch with id %s" % ledger_id)
    failed = ledger.fail_bouncer_batch(ledger_id, reason)
    if failed is not None:
        audit(who, "fail", "Bouncer batch %d" % ledger_id, reason)
        tell_webhook_sender(app)
    return failed


def tell_webhook_sender(app):
    """Batches that ended have their webhooks sent now. Redis away: the sender's schedule will."""
    try:
        trigger_webhook_sender(app.redis)
    except Exception as exc:
        log.warning("Cannot queue the webhook sender now (%s); its schedule will", type(exc).__name__)
