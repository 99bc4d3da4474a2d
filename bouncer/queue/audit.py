"""The audit log: who did what, when (operators' actions from the console, pauses)."""

import logging

from bouncer.store.database import utcnow
from bouncer.store.models import AuditEntry

log = logging.getLogger(__name__)


def audit(who, action, target, detail=None, now=None):
    AuditEntry.create(at=now or utcnow(), who=who, action=action, target=str(target),
                      detail=(detail or "")[:500] or None)


def recent_audit(limit=50):
    return list(AuditEntry.select().order_by(AuditEntry.id.desc()).limit(limit))

