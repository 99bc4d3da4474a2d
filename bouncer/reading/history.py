"""The last hours, for the console's charts: series read from what the service keeps.

- slot use: Bouncer batches in flight (reserved or outstanding) per check type, from the
  ledger's reserved_at and finished_at, sampled at the end of each step (the last point is now,
  so it equals `in_flight_batches` of the overview);
- requests per minute, from `rate_limit_tracker` (kept 24 h), counted by the database;
- emails verified per minute per check type: addresses of Bouncer batches that completed, by
  when they were ingested (the same definition as `emails_verified_total`);
- completion-to-results delay: per step, the longest wait between Bouncer saying a batch
  completed and its results being stored.
"""

import calendar
import datetime

from peewee import fn

from bouncer.names import CHECK_TYPES
from bouncer.states import BouncerBatchState
from bouncer.store.database import dialect, utcnow
from bouncer.store.models import BouncerBatch, RateLimitTracker

WINDOWS = {1: 60, 6: 300, 24: 900}     # hours shown: seconds per point
DEFAULT_HOURS = 6


def chart_series(settings, hours=DEFAULT_HOURS, now=None):
    """{"hours", "step_seconds", "times" (each point's end, ISO), "max_outstanding", "buffer",
    "slot_use": {check type: [n]}, "requests_per_minute": [n], "verified_per_minute":
    {check type: [n]}, "results_delay_seconds": [n or None]}."""
    step = WINDOWS[hours]
    now = now or utcnow()
    points = hours * 3600 // step
    start = now - datetime.timedelta(seconds=points * step)
    ends = [start + datetime.timedelta(seconds=(i + 1) * step) for i in range(points)]
    batches = ledger_since(start)
    return {
        "hours": hours, "step_seconds": step, "times": [t.isoformat() + "Z" for t in ends],
        "max_outstanding": settings.max_outstanding, "buffer": settings.rate_limit_buffer,
        "slot_use": {t: slot_use([b for b in batches if b.check_type == t], ends) for t in CHECK_TYPES},
        "requests_per_minute": per_minute(request_counts(start, step, points), step),
        "verified_per_minute": {t: per_minute(verified_counts(batches, t, start, step, points), step)
                                for t in CHECK_TYPES},
        "results_delay_seconds": results_delays(batches, start, step, points),
    }


def ledger_since(start):
    """Ledger rows in flight at some moment after `start`."""
    return list(BouncerBatch.select(BouncerBatch.check_type, BouncerBatch.status, BouncerBatch.quantity,
                                    BouncerBatch.reserved_at, BouncerBatch.finished_at,
                                    BouncerBatch.bouncer_completed_at)
                .where(BouncerBatch.finished_at.is_null() | (BouncerBatch.finished_at > start)))


def slot_use(batches, ends):
    return [sum(1 for b in batches if b.reserved_at <= t and (b.finished_at is None or b.finished_at > t))
            for t in ends]


def step_of(moment, start, step):
    return int((moment - start).total_seconds() // step)


def per_minute(counts, step):
    return [round(n * 60 / step, 2) for n in counts]


def request_counts(start, step, points):
    """Requests recorded in each step, counted by the database (a day may hold 250,000)."""
    bucket = step_expression(RateLimitTracker.requested_at, start, step)
    counts = [0] * points
    query = (RateLimitTracker.select(bucket, fn.COUNT(RateLimitTracker.id))
             .where(RateLimitTracker.requested_at >= start).group_by(bucket))
    for index, n in query.tuples():
        if index is not None and int(index) >= 0:   # `now`'s last fraction of a second is the last step's
            counts[min(points - 1, int(index))] += n
    return counts


def step_expression(column, start, step):
    """The step a time falls in, in SQL: whole seconds since `start`, divided by `step`."""
    origin = calendar.timegm(start.timetuple())
    return dialect().step_of(column, origin, step)


def verified_counts(batches, check_type, start, step, points):
    counts = [0] * points
    for b in batches:
        if b.check_type == check_type and b.status == BouncerBatchState.COMPLETED and b.finished_at > start:
            counts[min(points - 1, step_of(b.finished_at, start, step))] += b.quantity
    return counts


def results_delays(batches, start, step, points):
    delays = [None] * points
    for b in batches:
        if b.status == BouncerBatchState.COMPLETED and b.bouncer_completed_at is not None and b.finished_at > start:
            index = min(points - 1, step_of(b.finished_at, start, step))
            delay = max(0.0, (b.finished_at - b.bouncer_completed_at).total_seconds())
            delays[index] = round(max(delays[index] or 0.0, delay), 1)
    return delays

