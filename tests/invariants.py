"""Checks of design.md's invariants against the database, shared by tests and the soak run.

Each function returns a list of violations (empty when the invariant holds), so a caller can
assert on it or report it.
"""
from peewee import JOIN, fn

from bouncer.models import (
    DONE, FAILED, IN_FLIGHT_STATES, INVALID, QUEUED, REJECTED, BouncerBatch, BouncerBatchEmail,
    UserBatchEmail, result_model,
)


def no_address_in_two_in_flight_batches():
    """Invariant 2: per check type, a stripped address is in at most one in-flight batch, and a
    batch holds each stripped address once."""
    Item = BouncerBatchEmail
    in_flight = (Item.select(Item.check_type, Item.email_global, fn.COUNT(Item.id))
                 .join(BouncerBatch)
                 .where(BouncerBatch.status.in_(IN_FLIGHT_STATES))
                 .group_by(Item.check_type, Item.email_global)
                 .having(fn.COUNT(Item.id) > 1))
    per_batch = (Item.select(Item.bouncer_batch, Item.email_global, fn.COUNT(Item.id))
                 .group_by(Item.bouncer_batch, Item.email_global)
                 .having(fn.COUNT(Item.id) > 1))
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
    unfinished = Row.select().where(Row.status.not_in((DONE, FAILED, INVALID))).count()
    if unfinished:
        problems.append("%d emails not finished" % unfinished)
    no_reason = Row.select().where(Row.status.in_((FAILED, INVALID)) & Row.failure_reason.is_null()).count()
    if no_reason:
        problems.append("%d failed emails without a reason" % no_reason)
    for check_type in ("deliverable", "catchall"):
        Result = result_model(check_type)
        orphans = (Row.select().join(Result, on=(Result.email_global == Row.email_global),
                                     join_type=JOIN.LEFT_OUTER)
                   .where((Row.status == DONE) & (Row.check_type == check_type)
                          & Result.email_global.is_null()).count())
        if orphans:
            problems.append("%d done %s emails without a stored result" % (orphans, check_type))
    return problems


def fifo_key(row):
    return (row.batch_id, row.position)


def sent_out_of_fifo_order(before_ledger_id, check_type):
    """Invariant 5, for what one creation cycle did (ledger rows with id > before_ledger_id):
    no queued email is older than an address this cycle sent, unless that email's own attempt
    failed in this very cycle."""
    cycle = BouncerBatch.select().where((BouncerBatch.id > before_ledger_id)
                                        & (BouncerBatch.check_type == check_type))
    sent = [b.id for b in cycle if b.status != REJECTED]
    if not sent:
        return []
    rejected_now = [b.id for b in cycle if b.status == REJECTED]
    Row, Item = UserBatchEmail, BouncerBatchEmail
    # The oldest row of each sent address is what put the address in the batch; later rows of
    # the same address only ride along.
    oldest = {}
    for gid, batch, position in (Row.select(Row.email_global, Row.batch, Row.position)
                                 .where(Row.bouncer_batch.in_(sent)).tuples()):
        oldest[gid] = min(oldest.get(gid, (batch, position)), (batch, position))
    newest_sent = max(oldest.values())
    queued = Row.select().where((Row.check_type == check_type) & (Row.status == QUEUED))
    excused = set()
    if rejected_now:
        excused = {gid for (gid,) in Item.select(Item.email_global)
                   .where(Item.bouncer_batch.in_(rejected_now)).tuples()}
    return ["queued email %s (%s) is older than sent %s" % (r.id, fifo_key(r), newest_sent)
            for r in queued if fifo_key(r) < newest_sent and r.email_global_id not in excused]
