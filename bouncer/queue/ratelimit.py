"""The request budget: every Bouncer call takes a slot here first, all processes together.

A slot is granted only while fewer than RATE_LIMIT_BUFFER requests were recorded in the last
60 s plus a transit margin (and, for batch creation, fewer than Bouncer's own 60 creates a
minute). Check and record
happen in one serialized transaction, so two processes can never both take the last slot.
"""

import datetime
import logging

from bouncer.store.database import serialize_on, utcnow, write_transaction
from bouncer.store.models import RateLimitTracker

log = logging.getLogger(__name__)


# A request is recorded just before it is sent and reaches Bouncer a little later. Counting a
# window longer than Bouncer's by more than that transit keeps every 60 s window at Bouncer's
# end inside a counted one, so the buffer holds where it matters.
TRANSIT_MARGIN = datetime.timedelta(seconds=2)
WINDOW = datetime.timedelta(seconds=60) + TRANSIT_MARGIN


CREATES_PER_MINUTE = 60     # Bouncer's own limit on batch creation
# Kept for the console's and /metrics' charts of the last hours; the window count stays an
# index range scan whatever is kept.
KEEP_HISTORY = datetime.timedelta(hours=24)


def take_request_slot(kind, buffer, check_type=None, now=None):
    """Record one Bouncer request of `kind` ('create', 'status', 'download') if the budget allows.

    Returns True when the caller may make the request, False when it must wait."""
    with write_transaction():
        serialize_on("rate_limit_tracker")
        # The clock is read after the lock, so recorded times only ever grow.
        now = now or utcnow()
        if requests_in_window(now) >= buffer:
            return False
        if kind == "create" and requests_in_window(now, kind="create") >= CREATES_PER_MINUTE:
            return False
        RateLimitTracker.create(requested_at=now, kind=kind, check_type=check_type)
        return True


def requests_in_window(now=None, kind=None):
    """Requests recorded in the window (60 s and the transit margin) before `now`."""
    now = now or utcnow()
    query = RateLimitTracker.select().where(RateLimitTracker.requested_at > now - WINDOW)
    if kind:
        query = query.where(RateLimitTracker.kind == kind)
    return query.count()


def forget_old_requests(now=None):
    """Drop history nobody needs, so the window count stays an index range scan. A read of the
    index first: when nothing is that old, no write lock is taken."""
    old = RateLimitTracker.requested_at < (now or utcnow()) - KEEP_HISTORY
    if not RateLimitTracker.select().where(old).exists():
        return 0
    return RateLimitTracker.delete().where(old).execute()

