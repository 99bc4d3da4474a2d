"""Erasure and retention as every door takes them (the CLI, the HTTP API, the console, the daily
job): what is asked is checked before anything is touched, the work is queue/erasure.py's and
queue/retention.py's, and each is audited without the erased value (queue/audit.py), the
database's files are scrubbed of it where the database allows (store.database), and the webhook
sender is told of batches an erasure ended."""
import datetime
import logging
from dataclasses import dataclass

from bouncer.addresses import strip_email_modifiers
from bouncer.doors.admission import row_problem
from bouncer.doors.loading import echo
from bouncer.errors import Conflict, InputError, NotFound
from bouncer.queue import erasure, fairness, retention
from bouncer.queue.audit import UNKEYED, audit, erased_before, fingerprint
from bouncer.services import idempotency
from bouncer.services.batches import tell_webhook_sender
from bouncer.store.database import scrub_erased_pages, utcnow
from bouncer.store.models import UserBatch

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What an erasure did, as its door reports it."""
    erased: erasure.Erased
    fingerprint: str | None   # the audit's keyed hash of the erased value, if a key is set
    note: str | None = None   # what the database's files may still hold, when anything

    def summary(self):
        return "erased: %s" % self.erased.summary()


def forget_user(app, user_id, who, now=None):
    """Erase every user batch of `user_id` (module erasure.py says what that removes). NotFound
    when the user has none; Conflict, erasing nothing, while one is still being written."""
    now = now or utcnow()
    user_id = (user_id or "").strip()
    if not user_id:
        raise InputError("a user id is required (--user USER)")
    mark = fingerprint("user", user_id, app.settings.erasure_audit_key)
    batch_ids = erasure.batches_of_user(user_id)
    if not batch_ids:
        raise NotFound("no user batch of user %r: nothing to erase%s" % (echo(user_id), earlier(mark)))
    busy = erasure.batch_being_written(batch_ids, now)
    if busy is not None:
        raise Conflict("user batch %s of this user is still being written (a submit under way); nothing was "
                       "erased: run this again once it ends" % busy)
    erased = erasure.Erased()
    for batch_id in batch_ids:
        erased.add(erasure.erase_batch(batch_id, now))
    erased.weights = fairness.forget_user(user_id)
    return finish(who, "forget user", erased, now, mark=mark)


def forget_email(app, address, who, now=None):
    """Erase the address in every spelling that strips to the same mailbox: its rows blanked in
    place, the address with its verdicts and flight. InputError for a malformed address (nothing
    touched), NotFound when nothing holds it."""
    now = now or utcnow()
    address = (address or "").strip()
    problem = row_problem(address)
    if problem is not None:
        raise InputError("not an email address: %r: %s" % (echo(address), problem))
    mailbox = strip_email_modifiers(address)
    mark = fingerprint("address", mailbox, app.settings.erasure_audit_key)
    erased = erasure.forget_address(mailbox, now)
    if erased is None:
        raise NotFound("nothing holds %r in any spelling: nothing to erase%s" % (echo(address), earlier(mark)))
    tell_webhook_sender(app)   # batches whose last pending row it was have ended
    return finish(who, "forget address", erased, now, mark=mark)


def erase_user_batch(app, batch_id, who, now=None):
    """Erase one user batch whole. NotFound; Conflict while it is still being written."""
    now = now or utcnow()
    if not UserBatch.select().where(UserBatch.id == batch_id).exists():
        raise NotFound("no user batch with id %s" % batch_id)
    if erasure.batch_being_written([batch_id], now) is not None:
        raise Conflict("user batch %s is still being written (a submit under way): erase it once that ends"
                       % batch_id)
    return finish(who, "erase batch", erasure.erase_batch(batch_id, now), now, target="user batch %d" % batch_id)


def finish(who, action, erased, now, mark=None, target=None):
    """Audit the erasure (counts, and `target` or the keyed hash `mark` of the erased value),
    scrub the database's files, log it without values."""
    audit(who, action, target or mark or UNKEYED, erased.summary(), now=now)
    note = scrub_erased_pages()
    log.warning("Erasure (%s) by %s: %s", action, who, erased.summary())
    return Outcome(erased, mark, note)


def earlier(mark):
    """How the audit log answers a request for what is no longer held: erased before, and when."""
    times = erased_before(mark)
    if not times:
        return ""
    return " (erased before: %s)" % ", ".join(t.isoformat(sep=" ", timespec="seconds") + " UTC" for t in times)


def prune(app, who, days=None, now=None, seconds=None):
    """Remove what the retention period (`days`, default RETENTION_DAYS; with 0 there, rows and
    verdicts are kept forever) no longer keeps, and idempotency records past their 24 h; within
    `seconds` when given. Returns the Pruned report."""
    now = now or utcnow()
    if days is None and not app.settings.retention_days:
        report = retention.Pruned(kept_forever=True)
    else:
        days = app.settings.retention_days if days is None else days
        report = retention.prune(now - datetime.timedelta(days=days), now, retention.Deadline(seconds))
    report.keys = idempotency.forget_expired(now)
    if report.removed_anything:
        audit(who, "prune", "expired idempotency records" if report.kept_forever else "retention %s day(s)" % days,
              report.summary(), now=now)
        scrub_erased_pages()
        log.info("Pruned by %s: %s", who, report.summary())
    return report
