"""Checks of design.md's invariants against the database, shared by tests and the soak run.

Each check returns a list of violations (empty when the invariant holds), so a caller can
assert on it or report it; the `max_*` functions measure what a report shows beside a limit.
"""
import datetime
import json

from peewee import JOIN, fn

from bouncer.states import FINAL_ROW_STATES, IN_FLIGHT_STATES, BouncerBatchState, RowState
from bouncer.store.bulk import among
from bouncer.store.models import (
    BouncerBatch, BouncerBatchEmail, QueuedEmail, RidingRows, UserBatch, UserBatchEmail, result_model,
)


def no_address_in_two_in_flight_batches():
    """Invariant 2: per check type, a stripped address is in at most one in-flight batch, and a
    batch holds each stripped address once."""
    Item = BouncerBatchEmail
    in_flight = (Item.select(Item.check_type, Item.email_global, fn.COUNT(Item.email_global))
                 .join(BouncerBatch)
                 .where(BouncerBatch.status.in_(IN_FLIGHT_STATES))
                 .group_by(Item.check_type, Item.email_global)
                 .having(fn.COUNT(Item.email_global) > 1))
    per_batch = (Item.select(Item.bouncer_batch, Item.email_global, fn.COUNT(Item.email_global))
                 .group_by(Item.bouncer_batch, Item.email_global)
                 .having(fn.COUNT(Item.email_global) > 1))
    return (["address %s in %d in-flight %s batches" % (g, n, t) for t, g, n in in_flight.tuples()]
            + ["address %s %d times in batch %s" % (g, n, b) for b, g, n in per_batch.tuples()])


def at_most_max_outstanding(max_outstanding):
    """Invariant 3."""
    query = (BouncerBatch.select(BouncerBatch.check_type, fn.COUNT(BouncerBatch.id))
             .where(BouncerBatch.status.in_(IN_FLIGHT_STATES)).group_by(BouncerBatch.check_type))
    return ["%d %s batches in flight (max %d)" % (n, t, max_outstanding)
            for t, n in query.tuples() if n > max_outstanding]


def every_email_finished():
    """Invariant 1 at quiescence: every row has a verdict, or a recorded failure reason."""
    problems = []
    Row = UserBatchEmail
    unfinished = Row.select().where(Row.status.not_in(FINAL_ROW_STATES)).count()
    if unfinished:
        problems.append("%d emails not finished" % unfinished)
    no_reason = (Row.select().where(Row.status.in_((RowState.FAILED, RowState.INVALID)) & Row.failure_reason.is_null())
                 .count())
    if no_reason:
        problems.append("%d failed emails without a reason" % no_reason)
    for check_type in ("deliverable", "catchall"):
        Result = result_model(check_type)
        orphans = (Row.select().join(Result, on=(Result.email_global == Row.email_global),
                                     join_type=JOIN.LEFT_OUTER)
                   .where((Row.status == RowState.DONE) & (Row.check_type == check_type)
                          & Result.email_global.is_null()).count())
        if orphans:
            problems.append("%d done %s emails without a stored result" % (orphans, check_type))
    return problems + queue_matches_rows()


def riding(where=None):
    """(ledger id, row id) of every row riding on a Bouncer batch (of the riding rows `where`
    holds for)."""
    query = RidingRows.select(RidingRows.bouncer_batch, RidingRows.row_ids)
    if where is not None:
        query = query.where(where)
    return [(ledger_id, row_id) for ledger_id, row_ids in query.tuples() for row_id in json.loads(row_ids)]


def queue_matches_rows():
    """Every queued row is either in line or riding on one Bouncer batch, never both; no other
    row is in either (invariants 1 and 2 rest on it)."""
    Row = UserBatchEmail
    queued = {r for (r,) in Row.select(Row.id).where(Row.status == RowState.QUEUED).tuples()}
    waiting = {r for (r,) in QueuedEmail.select(QueuedEmail.row).tuples()}
    riders = [row_id for _, row_id in riding()]
    twice = len(riders) - len(set(riders))
    riders = set(riders)
    neither = len(queued - waiting - riders)
    both = len(waiting & riders)
    ended = len((waiting | riders) - queued)
    return (["%d queued rows neither in line nor riding" % neither] if neither else []) \
        + (["%d rows in line and riding" % both] if both else []) \
        + (["%d rows not queued but in line or riding" % ended] if ended else []) \
        + (["%d rows riding on two Bouncer batches" % twice] if twice else [])


def fifo_key(row):
    """A row's place in the FIFO: its user batch's place in line, then its position."""
    return (row.fifo_order, row.position)


def sent_out_of_fifo_order(before_ledger_id, check_type):
    """Invariant 5, for what one creation cycle did (ledger rows with id > before_ledger_id):
    no queued email is older than an address this cycle sent, unless that email's own attempt
    failed in this very cycle, or it was waiting (its re-check not yet due, its address greylisted
    or on a batch being finished) when the cycle began."""
    cycle, sent, rejected_now = attempts_of_cycle(before_ledger_id, check_type)
    if not sent:
        return []
    Row = UserBatchEmail
    # The oldest row of each sent address is what put the address in the batch; later rows of
    # the same address only ride along.
    oldest = {}
    for gid, place, position in (Row.select(Row.email_global, Row.fifo_order, Row.position)
                                 .where(rows_of_ledgers(sent)).tuples()):
        oldest[gid] = min(oldest.get(gid, (place, position)), (place, position))
    newest_sent = max(oldest.values())
    waiting = (Row.select().join(QueuedEmail, on=(QueuedEmail.row == Row.id))
               .where(Row.check_type == check_type))
    excused = set(waited_on_purpose(check_type, min(b.reserved_at for b in cycle)))
    # A requeued email keeps the id of the attempt that carried it: excused if that attempt
    # failed in this very cycle.
    return ["queued email %s (%s) is older than sent %s" % (r.id, fifo_key(r), newest_sent)
            for r in waiting if fifo_key(r) < newest_sent and r.bouncer_batch_id not in rejected_now
            and r.id not in excused]


def attempts_of_cycle(before_ledger_id, check_type):
    """The Bouncer batches of `check_type` one creation cycle made (ids after `before_ledger_id`):
    all of them, the ids of those sent, and the ids of those whose create call failed in it
    (rejected, or abandoned: the call timed out)."""
    cycle = list(BouncerBatch.select().where((BouncerBatch.id > before_ledger_id)
                                             & (BouncerBatch.check_type == check_type)))
    failed_calls = (BouncerBatchState.REJECTED, BouncerBatchState.ABANDONED)
    return (cycle, [b.id for b in cycle if b.status not in failed_calls],
            [b.id for b in cycle if b.status in failed_calls])


def waited_on_purpose(check_type, moment):
    """Ids of the rows in line that the packer leaves waiting at `moment`: a re-check not yet
    due, an address greylisted until later, an address on a batch being finished."""
    Line = QueuedEmail
    Result = result_model(check_type)
    not_due = Line.select(Line.row).where((Line.check_type == check_type) & (Line.not_before > moment))
    held = (Line.select(Line.row).join(Result, on=(Result.email_global == Line.email_global))
            .where((Line.check_type == check_type) & (Result.retry_after > moment)))
    finishing = (Line.select(Line.row)
                 .join(BouncerBatchEmail, on=((BouncerBatchEmail.email_global == Line.email_global)
                                              & (BouncerBatchEmail.check_type == Line.check_type)))
                 .join(BouncerBatch, on=(BouncerBatch.id == BouncerBatchEmail.bouncer_batch))
                 .where((Line.check_type == check_type) & BouncerBatch.finish_reason.is_null(False)))
    return [row_id for query in (not_due, held, finishing) for (row_id,) in query.tuples()]


def sent_out_of_user_order(before_ledger_id, check_type):
    """Invariant 5 within each user (what QUEUE_POLICY=fair keeps of it), for what one creation
    cycle did: no queued email of a user is older than an address this cycle sent for that user,
    unless that email's own attempt failed in this very cycle."""
    _, sent, rejected_now = attempts_of_cycle(before_ledger_id, check_type)
    if not sent:
        return []
    Row = UserBatchEmail
    newest = {}
    for user_id, place, position in (Row.select(UserBatch.user_id, Row.fifo_order, Row.position).join(UserBatch)
                                     .where(rows_of_ledgers(sent)).tuples()):
        newest[user_id] = max(newest.get(user_id, (place, position)), (place, position))
    waiting = (Row.select(Row.id, Row.fifo_order, Row.position, Row.bouncer_batch, UserBatch.user_id)
               .join_from(Row, QueuedEmail, on=(QueuedEmail.row == Row.id)).join_from(Row, UserBatch)
               .where(Row.check_type == check_type).tuples())
    return ["queued email %s of %s (%s) is older than its sent %s" % (row_id, user_id, (place, position),
                                                                     newest[user_id])
            for row_id, place, position, attempt, user_id in waiting
            if user_id in newest and (place, position) < newest[user_id] and attempt not in rejected_now]


def rows_of_ledgers(ledger_ids):
    """The rows riding on one of these Bouncer batches, or brought to an end by one."""
    Row = UserBatchEmail
    riders = [row_id for _, row_id in riding(RidingRows.bouncer_batch.in_(ledger_ids))]
    ended = Row.status.in_((RowState.DONE, RowState.FAILED))
    return (Row.bouncer_batch.in_(ledger_ids) & ended) | among(Row.id, riders)


# -- checks over a whole run, for the soak (support/soak) -------------------------------------

FAILED_ATTEMPTS = (BouncerBatchState.REJECTED, "abandoned")


def max_in_flight_from_ledger(check_type):
    """Invariant 3 over the run's whole history: the most Bouncer batches of `check_type` that
    were ever in flight together, from the ledger's times (in flight from `reserved_at` until
    `finished_at`; still in flight when it has none).

    Sound with the code's own clocks: a cycle counts the batches in flight before it reserves,
    and a batch that left flight committed its `finished_at` before that count, so a new
    reservation's `reserved_at` (read after the count) is never earlier than the end it
    replaces. Ends recorded early (a status cycle's start time) can only lower the result."""
    events = []
    for reserved, finished in (BouncerBatch.select(BouncerBatch.reserved_at, BouncerBatch.finished_at)
                               .where(BouncerBatch.check_type == check_type).tuples()):
        events.append((reserved, 1))
        if finished is not None:
            events.append((finished, -1))
    # At equal times an end sorts first (-1 < 1): it freed the slot the start took.
    events.sort()
    highest = current = 0
    for _, change in events:
        current += change
        highest = max(highest, current)
    return highest


def requests_over_budget(times, buffer, window=60.0):
    """Invariant 4 for a list of request times (epoch seconds, any order): the times of the
    requests made when `buffer` or more had already been made in the `window` seconds before."""
    ordered = sorted(times)
    over, first = [], 0
    for index, moment in enumerate(ordered):
        while ordered[first] <= moment - window:
            first += 1
        if index - first >= buffer:
            over.append(moment)
    return over


def max_requests_in_window(times, window=60.0):
    """The most requests in any rolling `window` seconds, and when that window starts."""
    ordered = sorted(times)
    best, start, last = 0, None, 0
    for first, moment in enumerate(ordered):
        while last < len(ordered) and ordered[last] < moment + window:
            last += 1
        if last - first > best:
            best, start = last - first, moment
    return best, start


def fifo_violations_of_sent_batch(ledger_id, visible_at, same_cycle=datetime.timedelta(seconds=60)):
    """Invariant 5 for one Bouncer batch Bouncer accepted, judged at any time after its id was
    stored: rows older (FIFO) than the youngest address it sent, visible when it was reserved,
    that still waited for a later reservation.

    `visible_at` maps a user batch id to a time (naive UTC) by which its transaction had
    committed; rows of other user batches are not judged. A reservation reads `reserved_at`
    before it plans, so such a row was in its FIFO walk, which takes every older row first
    (sends it, attaches it to the batch in flight with its address, or completes it from a
    cached verdict). The design's exceptions are excused:
    - a row whose address another attempt held at that moment, or gave back at most
      `same_cycle` before it (rejected or abandoned earlier in the same cycle; or completed by
      an ingest racing the walk), as the rows and in-flight addresses of the ledger still show;
    - since a row sent again no longer names the failed attempt that parked it, the remaining
      late addresses are reported only when they outnumber the addresses of the calls that
      failed in that window.
    `same_cycle` must exceed the longest creation cycle; a larger one can only hide a violation,
    never invent one."""
    ledger = BouncerBatch.get_by_id(ledger_id)
    newest_sent = youngest_sent_key(ledger_id)
    if newest_sent is None:
        return []
    moment, check_type = ledger.reserved_at, ledger.check_type
    late = [(row_id, key, global_id, batch) for row_id, key, global_id, batch
            in rows_waiting_at(check_type, moment, newest_sent)
            if key < newest_sent and batch in visible_at and visible_at[batch] < moment]
    if not late:
        return []
    held = addresses_held_around(check_type, {item[2] for item in late}, moment, same_cycle, ledger_id)
    late = [item for item in late if item[2] not in held]
    unexplained = {item[2] for item in late}
    failed = failed_addresses_around(check_type, moment, same_cycle)
    if len(unexplained) <= failed:
        return []
    return ["row %s (user batch %s, position %s) waited while Bouncer batch %s (ledger %s, "
            "reserved %s) sent a younger address (place %s, position %s); %d such "
            "addresses, %d in calls that failed within %ss before"
            % (row_id, batch, key[1], ledger.bouncer_id, ledger_id, moment, *newest_sent,
               len(unexplained), failed, same_cycle.total_seconds())
            for row_id, key, global_id, batch in late]


def youngest_sent_key(ledger_id):
    """The FIFO key (place in line, position) of the row that put the batch's youngest address
    in it: the oldest row of each address is what put it there; later rows only ride along."""
    Row = UserBatchEmail
    oldest = {}
    for global_id, place, position in (Row.select(Row.email_global, Row.fifo_order, Row.position)
                                       .where(rows_of_ledgers([ledger_id])).tuples()):
        key = (place, position)
        if global_id not in oldest or key < oldest[global_id]:
            oldest[global_id] = key
    return max(oldest.values()) if oldest else None


def rows_waiting_at(check_type, moment, before_key):
    """(row id, FIFO key, address id, user batch) of the valid rows of user batches up to
    `before_key`'s place that were still waiting at `moment`: queued or parked now, taken by a
    batch reserved after it, or completed after it by a cached verdict. A queued row is in line,
    or riding (on the batch that took it, or parked on the failed attempt that did); an ended
    row names the batch that ended it, a requeued one the attempt that parked it."""
    Row, Taken = UserBatchEmail, BouncerBatch.alias()
    in_line = {r for (r,) in QueuedEmail.select(QueuedEmail.row).where(QueuedEmail.check_type == check_type).tuples()}
    taken = {b.id: (b.status, b.reserved_at)
             for b in BouncerBatch.select().where(BouncerBatch.check_type == check_type)}
    riders = {row_id: taken[ledger_id] for ledger_id, row_id in riding() if ledger_id in taken}
    query = (Row.select(Row.id, Row.batch, Row.fifo_order, Row.position, Row.email_global, Row.status,
                        Row.completed_at, Taken.status, Taken.reserved_at)
             .join(Taken, JOIN.LEFT_OUTER, on=(Row.bouncer_batch == Taken.id))
             .where((Row.check_type == check_type) & (Row.status != RowState.INVALID)
                    & (Row.fifo_order <= before_key[0])
                    & ((Row.status == RowState.QUEUED) | (Taken.reserved_at > moment)
                       | (Row.completed_at > moment) | Taken.status.in_(FAILED_ATTEMPTS))))
    waiting = []
    for row_id, batch, place, position, global_id, status, completed, taken_status, taken_at in query.tuples():
        if status == RowState.QUEUED and row_id not in in_line:
            taken_status, taken_at = riders[row_id]
        if row_id in in_line or (taken_status in FAILED_ATTEMPTS and status not in (RowState.DONE, RowState.FAILED)):
            still = True
        elif taken_status is not None and taken_status not in FAILED_ATTEMPTS:
            still = taken_at > moment
        else:
            still = completed is not None and completed > moment
        if still:
            waiting.append((row_id, (place, position), global_id, batch))
    return waiting


def addresses_held_around(check_type, global_ids, moment, same_cycle, other_than):
    """The addresses among `global_ids` that another attempt held at `moment` or gave back at
    most `same_cycle` before it, as the rows attached to attempts and the ledger's in-flight
    addresses show."""
    Row, Item = UserBatchEmail, BouncerBatchEmail
    around = ((BouncerBatch.id != other_than) & (BouncerBatch.check_type == check_type)
              & (BouncerBatch.reserved_at <= moment)
              & (BouncerBatch.finished_at.is_null() | (BouncerBatch.finished_at >= moment - same_cycle)))
    held = set()
    riders = [row_id for _, row_id in riding(RidingRows.bouncer_batch.in_(
        BouncerBatch.select(BouncerBatch.id).where(around)))]
    for part in chunks(sorted(global_ids), 500):
        for model in (Row, Item):
            query = (model.select(model.email_global)
                     .join(BouncerBatch, on=(model.bouncer_batch == BouncerBatch.id))
                     .where((model.check_type == check_type) & model.email_global.in_(part) & around))
            held.update(global_id for (global_id,) in query.tuples())
        query = Row.select(Row.email_global).where(among(Row.id, riders) & Row.email_global.in_(part))
        held.update(global_id for (global_id,) in query.tuples())
    return held


def failed_addresses_around(check_type, moment, same_cycle):
    """Addresses carried by attempts of `check_type` reserved by `moment` that failed (rejected
    or abandoned) at most `same_cycle` before it."""
    return (BouncerBatch.select(fn.COALESCE(fn.SUM(BouncerBatch.quantity), 0))
            .where((BouncerBatch.check_type == check_type)
                   & BouncerBatch.status.in_(FAILED_ATTEMPTS)
                   & (BouncerBatch.reserved_at <= moment)
                   & (BouncerBatch.finished_at >= moment - same_cycle))
            .scalar())


def chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]
