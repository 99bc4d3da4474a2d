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
    rates = {}
    found = {}
    for batch in batches:
        ahead = place_in_line(batch)
        if ahead is not None and batch.check_type not in rates:
            rates[batch.check_type] = addresses_per_second(batch.check_type, now)
        found[batch.id] = {"weight": weights[batch.user_id], "place_in_line": ahead,
                           "estimated_start_at": estimated_start(ahead, rates.get(batch.check_type), now)}
    return found


def place_in_line(batch):
    """Rows in line ahead of the batch's next row (in the order packing walks the line), or None
    when the batch has none in line."""
    if batch.status not in IN_LINE_STATES or batch.fifo_order is None:
        return None
    head = next_row(batch)
    if head is None:
        return None
    key = (Line.turn, Line.fifo_order, Line.position)
    return Line.select().where((Line.check_type == batch.check_type) & (Tuple(*key) < Tuple(*head))).count()


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
