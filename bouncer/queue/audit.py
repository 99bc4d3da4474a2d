"""The audit log: who did what, when (operators' actions from the console, pauses, erasures).

An erasure is audited without what it erased: when, by whom, what kind, how many rows, and in
place of the user id or address a keyed hash of it (`fingerprint`), by which a later request
for the same person is matched and nothing else: without the key, which the database never
holds, a copy of the log cannot even confirm a guess."""

import hashlib
import hmac
import logging

from bouncer.store.database import utcnow
from bouncer.store.models import AuditEntry

log = logging.getLogger(__name__)

UNKEYED = "(no ERASURE_AUDIT_KEY: not kept)"


def audit(who, action, target, detail=None, now=None):
    AuditEntry.create(at=now or utcnow(), who=who, action=action, target=str(target),
                      detail=(detail or "")[:500] or None)


def recent_audit(limit=50):
    return list(AuditEntry.select().order_by(AuditEntry.id.desc()).limit(limit))


def fingerprint(kind, value, key):
    """HMAC-SHA256, keyed with `key` (ERASURE_AUDIT_KEY), of an erased value of `kind` (`user`,
    `address`: the stripped mailbox, so every spelling matches); None without a key."""
    if not key:
        return None
    digest = hmac.new(key.encode(), ("%s\n%s" % (kind, value)).encode(), hashlib.sha256).hexdigest()
    return "hmac-sha256:%s" % digest


def erased_before(fingerprint_):
    """When erasures audited under this fingerprint were made, oldest first."""
    if fingerprint_ is None:
        return []
    return [at for (at,) in AuditEntry.select(AuditEntry.at).where(AuditEntry.target == fingerprint_)
            .order_by(AuditEntry.at).tuples()]
