"""Pausing batch creation for a check type, by an operator or because Bouncer's account ran out
of credits. Kept in the database, so every worker, web process and the CLI agree.

An operator's pause lasts until an operator resumes. A credits pause starts when a create
answers 402; while it lasts, the creation cycle asks Bouncer for the balance (`GET
/v1.1/credits`, a request of the rate limit like any other) at most once every CREDITS_CHECK,
and resumes by itself once the balance is above what it was when creation stopped (credits
were bought). A 402 means the whole account, so it pauses
every check type.
"""

import datetime
import logging
import re

from bouncer.logs import ids
from bouncer.names import CHECK_TYPES
from bouncer.queue.audit import audit
from bouncer.store.database import utcnow, write_transaction
from bouncer.store.models import Pause

log = logging.getLogger(__name__)


OPERATOR, CREDITS = "operator", "credits"


CREDITS_CHECK = datetime.timedelta(seconds=60)


def current_pauses():
    """{check type: its Pause}."""
    return {p.check_type: p for p in Pause.select()}


def pause_of(check_type):
    return Pause.get_or_none(Pause.check_type == check_type)


def pause(check_type, reason, who, now=None):
    """An operator pauses creation for `check_type` (a credits pause stays as it is)."""
    now = now or utcnow()
    with write_transaction():
        if pause_of(check_type) is None:
            Pause.create(check_type=check_type, cause=OPERATOR, reason=reason, since=now)
        audit(who, "pause", check_type, reason, now)
    log.warning("Batch creation paused for %s by %s: %s", check_type, who, reason,
                extra=ids(check_type=check_type))


def resume(check_type, who, now=None):
    now = now or utcnow()
    with write_transaction():
        removed = Pause.delete().where(Pause.check_type == check_type).execute()
        audit(who, "resume", check_type, None, now)
    if removed:
        log.warning("Batch creation resumed for %s by %s", check_type, who, extra=ids(check_type=check_type))
    return bool(removed)


def pause_for_credits(message, now=None):
    """Bouncer answered 402: every check type waits for credits. Its message says how many are
    left ("12 credits left"), when it says."""
    now = now or utcnow()
    left = re.search(r"(\d+) credits? left", message)
    with write_transaction():
        for check_type in CHECK_TYPES:
            if pause_of(check_type) is None:
                Pause.create(check_type=check_type, cause=CREDITS, since=now, next_check_at=now + CREDITS_CHECK,
                             credits_left=int(left.group(1)) if left else 0,
                             reason="out of Bouncer credits (%s); checking the balance every %d s"
                             % (message, CREDITS_CHECK.total_seconds()))
    log.error("Batch creation paused: Bouncer says the account is out of credits (%s)", message)


def credits_check_due(check_type, now=None):
    p = pause_of(check_type)
    return p is not None and p.cause == CREDITS and p.next_check_at <= (now or utcnow())


def credits_checked(balance, now=None):
    """The balance Bouncer gave: above what was left when creation stopped, every credits pause
    ends; otherwise it waits for the next check."""
    now = now or utcnow()
    with write_transaction():
        back = balance > max([p.credits_left or 0 for p in Pause.select().where(Pause.cause == CREDITS)] or [0])
        if back:
            Pause.delete().where(Pause.cause == CREDITS).execute()
        else:
            Pause.update(next_check_at=now + CREDITS_CHECK).where(Pause.cause == CREDITS).execute()
    if back:
        log.warning("Bouncer has credits again (%d): batch creation resumes", balance)

