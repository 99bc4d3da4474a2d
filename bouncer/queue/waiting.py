"""What a user waits for, in the status object: the user's weight, how many addresses are in
line ahead of the batch's next row (`place_in_line`), and when that row is likely to go out
(`estimated_start_at`), from the rate at which Bouncer batches turned over lately.

Estimates, and said to be: the line moves as rows are admitted, cached or sent, and Bouncer's
pace varies. Each figure is a walk of one index range, a few queries for a page of batches.
"""

import datetime

from peewee import Tuple, fn

from bouncer.queue.fairness import weights_of
from bouncer.states import BatchState, BouncerBatchState
from bouncer.store.database import utcnow
from bouncer.store.models import BouncerBatch, QueuedEmail

Line = QueuedEmail
# The pace of the last hour: long enough to hold several slot turnovers at Bouncer's usual
# 100,000-200,000 addresses an hour, short enough to follow a change of pace.
RATE_WINDOW = datetime.timedelta(hours=1)
IN_LINE_STATES = (BatchState.QUEUED, BatchState.PROCESSING)


def waiting_of(batches, now=None):
    """{batch id: {"weight", "place_in_line", "estimated_start_at"}} for user batches (models);
    the last two None for a batch with no row in line."""
    now = now or utcnow()
    weights = weights_of({b.user_id for b in batches})
    ahead = places_in_line(batches)
    rates = {t: addresses_per_second(t, now) for t in {b.check_type for b in batches if ahead.get(b.id) is not None}}
    return {b.id: {"weight": weights[b.user_id], "place_in_line": ahead.get(b.id),
                   "estimated_start_at": estimated_start(ahead.get(b.id), rates.get(b.check_type), now)}
            for b in batches}


def place_in_line(batch):
    """Rows in line ahead of the batch's next row (in the order packing walks the line), or None
    when the batch has none in line."""
    return places_in_line([batch]).get(batch.id)


def places_in_line(batches):
    """{batch id: rows in line ahead of its next row} for those of `batches` with a row in line.
    Per check type the line is counted once, up to the last of their next rows, a range of its
    index between each one and the next (a page of batches behind a million rows costs one
    pass, not one each)."""
    heads = {}
    for batch in batches:
        head = next_row(batch) if batch.status in IN_LINE_STATES and batch.fifo_order is not None else None
        if head is not None:
            heads.setdefault(batch.check_type, []).append((tuple(head), batch.id))
    found = {}
    for check_type, ordered in heads.items():
        ahead, before = 0, None
        for head, batch_id in sorted(ordered):
            ahead += rows_between(check_type, before, head)
            found[batch_id], before = ahead, head
    return found


def rows_between(check_type, first, last):
    """Rows in line of `check_type` from key `first` (None: the front) up to, not with, `last`."""
    key = Tuple(Line.turn, Line.fifo_order, Line.position)
    where = (Line.check_type == check_type) & (key < Tuple(*last))
    if first is not None:
        where &= key >= Tuple(*first)
    return Line.select().where(where).count()


def next_row(batch):
    """(turn, place in line, position) of the batch's first row in line, or None."""
    return (Line.select(Line.turn, Line.fifo_order, Line.position)
            .where((Line.check_type == batch.check_type) & (Line.user_id == batch.user_id)
                   & (Line.fifo_order == batch.fifo_order) & (Line.batch_id == batch.id))
            .order_by(Line.position).limit(1).tuples().first())


def addresses_per_second(check_type, now):
    """Addresses of the Bouncer batches of `check_type` that completed within RATE_WINDOW, per
    second since the first of them was sent (None when none completed)."""
    since = now - RATE_WINDOW
    addresses, first_sent = (BouncerBatch.select(fn.SUM(BouncerBatch.quantity), fn.MIN(BouncerBatch.sent_at))
                             .where((BouncerBatch.check_type == check_type)
                                    & (BouncerBatch.status == BouncerBatchState.COMPLETED)
                                    & (BouncerBatch.finished_at > since))
                             .scalar(as_tuple=True))
    if not addresses or first_sent is None:
        return None
    seconds = (now - max(first_sent, since)).total_seconds()
    return addresses / seconds if seconds > 0 else None


def estimated_start(ahead, rate, now):
    """When the batch's next row is likely to go out: now when nothing is ahead of it; None when
    the pace is not known yet."""
    if ahead is None:
        return None
    if ahead == 0:
        return iso(now)
    if not rate:
        return None
    return iso(now + datetime.timedelta(seconds=ahead / rate))


def iso(moment):
    return moment.isoformat() + "Z"
