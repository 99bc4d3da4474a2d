"""The line: admitted rows waiting to be sent, and rows riding on a Bouncer batch.

A queued row is in exactly one of two places: waiting in line (`queued_emails`, one narrow row
each, walked by packing in order of turn, place in line, then position), or riding on a Bouncer
batch in flight (`riding_rows`, one row per Bouncer batch and user batch, holding the rows'
ids). A batch that became visible takes its place in line from a counter (`take_places`), so
places are given in commit order; a row's turn is 0 under QUEUE_POLICY `fifo` and its fair
share's start tag under `fair` (fairness.py). A row riding on a rejected or abandoned attempt
goes back in line where it was: first, in its user's order; so does a row whose address came
back greylisted (`unknown` with a `retryAfter`), not to be sent before that time
(`not_before`). Nothing here ends a row: progress.py does.
"""

import json
import logging

from peewee import SQL, Query, Tuple

from bouncer.queue import fairness
from bouncer.states import RowState
from bouncer.store.bulk import among, chunked, insert_tuples, looked_up
from bouncer.store.database import database, dialect, lock_rows_for_change, lock_rows_for_update
from bouncer.store.dialect import LineJoin
from bouncer.store.models import FifoCounter, QueuedEmail, RidingRows, UserBatch, UserBatchEmail

log = logging.getLogger(__name__)

Row = UserBatchEmail
Line = QueuedEmail
Riding = RidingRows


def take_places(count):
    """The next `count` places in line. Inside a write transaction: the counter row stays
    locked until commit, so places are given in the order batches become visible."""
    last = dialect().add_to_counter(database, FifoCounter._meta.table_name, count)
    return list(range(last - count + 1, last + 1))


# What the line keeps of a row: each field of the line, and the field of the row it copies.
LINE_COPIES = ((Line.row, Row.id), (Line.batch_id, Row.batch), (Line.check_type, Row.check_type),
               (Line.fifo_order, Row.fifo_order), (Line.position, Row.position),
               (Line.email_global, Row.email_global), (Line.email, Row.email), (Line.rechecks, Row.rechecks))


LINE_TARGET = tuple(line.column_name for line, _ in LINE_COPIES)
LINE_SOURCE = tuple(row.column_name for _, row in LINE_COPIES)
# Where each field of the line is in a row of LINE_SOURCE columns.
AT = {line.name: index for index, (line, _) in enumerate(LINE_COPIES)}


# A row not yet admitted: it has no check type until admission (or a cancel) gives it its
# batch's, so its own index finds it without naming the status (see schema.py).
NOT_ADMITTED_SQL = "check_type IS NULL AND status = 'new'"


def not_admitted():
    return Row.check_type.is_null() & (Row.status == RowState.NEW)


def lock_batches(batch_ids, where=None):
    """Lock these user batches' rows (those of them `where` holds for), in order of id, before
    any of their rows changes. Every writer that changes a batch's rows and then the batch (a
    claim, an admission, an ingest putting rows back for a re-check, the requeue of a failed
    attempt, a cancel, an erasure) takes the batch first, so none can hold rows another waits for
    while it waits for that one's batch (docs/architecture.md, "Locks")."""
    if batch_ids:
        query = UserBatch.select(UserBatch.id).where(among(UserBatch.id, sorted(batch_ids)))
        if where is not None:
            query = query.where(where)
        list(lock_rows_for_change(query.order_by(UserBatch.id)).tuples())


def joining_line(batch, first_position):
    """Inside an admitter's write transaction: how rows of `batch`, the first at
    `first_position`, join the line (their turns); `after_joining` with it once they did."""
    first, step, renumber_from = fairness.turns_for_new_rows(batch.check_type, batch.user_id,
                                                             (batch.fifo_order, first_position))
    return LineJoin(LINE_TARGET, LINE_SOURCE, batch.user_id, first, step), renumber_from


def after_joining(batch, renumber_from):
    fairness.keep_user_order(batch.check_type, batch.user_id, renumber_from)


def return_to_line(rows, not_before=None):
    """Rows (`LINE_SOURCE` columns of `user_batch_emails`, then their user) wait in line again,
    each check type's first in its users' order (fairness.turns_for_returning_rows). With
    `not_before` ({email_global id: time}), each waits until its address's time (a re-check)."""
    names = [line.name for line, _ in LINE_COPIES] + ["user_id", "turn"] + (["not_before"] if not_before else [])
    check_type_at, place_at, position_at = AT["check_type"], AT["fifo_order"], AT["position"]
    global_at = AT["email_global"]
    for check_type in {row[check_type_at] for row in rows}:
        back = [row for row in rows if row[check_type_at] == check_type]
        turns, disordered = fairness.turns_for_returning_rows(
            check_type, [(row[-1], row[place_at], row[position_at]) for row in back])
        due = [(not_before[row[global_at]],) if not_before else () for row in back]
        insert_tuples(Line, names, [row + (turn,) + when for row, turn, when in zip(back, turns, due)])
        fairness.renumber_users(check_type, disordered)


def leave_line(row_ids, span=None):
    """Take rows out of the line; returns the ids that were in it (a concurrent cancel may have
    taken some first). `span`, `(check type, first place, last place)` of a stretch of the line
    holding every one of them, lets the database find them by one range of the line's index,
    the ids only filtering it, rather than by one probe of the primary key per id (measured on
    PostgreSQL, 10,000 rows: 11 ms against 28 ms)."""
    if not row_ids:
        return []
    where = looked_up(Line.row, row_ids)
    if span is not None:
        check_type, first, last = span
        place = Tuple(Line.turn, Line.fifo_order, Line.position)
        where &= (Line.check_type == check_type) & (place >= Tuple(*first)) & (place <= Tuple(*last))
    return take_out_of_line(where)


def leave_line_of_batch(batch):
    """Take every row of one user batch out of the line (through the index of its user's rows:
    a batch's rows share its place in line); returns their ids."""
    if batch.fifo_order is None:
        return []
    return take_out_of_line(rows_in_line_of(Line, batch))


def rows_in_line_of(line, batch):
    """The condition on `line` (the model or an alias) for the rows in line of `batch` (a user
    batch, or a reference to one in the enclosing query), a range of the index of a user's rows."""
    return ((line.check_type == batch.check_type) & (line.user_id == batch.user_id)
            & (line.fifo_order == batch.fifo_order) & (line.batch_id == batch.id))


def take_out_of_line(where):
    """Delete the line's rows `where` holds for; returns their ids, so that a claim and a cancel
    racing for a row each act only on the rows they removed."""
    taken = Line.delete().where(where).returning(Line.row)
    return [r for (r,) in database.execute_sql(*taken.sql()).fetchall()]


def send_rows(rows, ledger_id, span=None):
    """Rows `(row id, user batch)` still in line (within `span`, see `leave_line`) leave it and
    ride on Bouncer batch `ledger_id`. Returns how many."""
    taken = set(leave_line([row_id for row_id, _ in rows], span))
    return ride(ledger_id, [row for row in rows if row[0] in taken])


def addresses_and_users(row_ids):
    """{row id: (email_global id, user id)} of these rows."""
    found = {}
    for part in chunked(row_ids):
        query = (Row.select(Row.id, Row.email_global, UserBatch.user_id).join(UserBatch)
                 .where(among(Row.id, part)).tuples())
        found.update((row_id, (global_id, user_id)) for row_id, global_id, user_id in query)
    return found


def ride(ledger_id, rows):
    """Rows `(row id, user batch)`, out of the line already, ride on Bouncer batch `ledger_id`.
    Returns how many."""
    by_batch = {}
    for row_id, batch in rows:
        by_batch.setdefault(batch, []).append(row_id)
    insert_tuples(Riding, ("bouncer_batch", "batch_id", "row_ids", "rows"),
                  [(ledger_id, batch, "[%s]" % ",".join(map(str, ids)), len(ids)) for batch, ids in by_batch.items()])
    return len(rows)


def riding_rows(ledger_id):
    """The ids of the rows riding on this Bouncer batch, as a subquery."""
    return SQL(dialect().ids_in_json("row_ids", "r.bouncer_batch_id = %s" % database.param), [ledger_id])


def riding_rows_of(ledger_ids):
    """{ledger id: [row ids]} of the rows riding on `ledger_ids` (ids or a subquery), locked
    until the transaction ends: rows an erasure takes off meanwhile are not put back in line."""
    found = {}
    query = Riding.select(Riding.bouncer_batch, Riding.row_ids).where(is_one_of(Riding.bouncer_batch, ledger_ids))
    for ledger_id, row_ids in lock_rows_for_update(query).tuples():
        found.setdefault(ledger_id, []).extend(json.loads(row_ids))
    return found


def stop_riding(ledger_id):
    """The batch's verdicts or its failure have reached its rows: none rides on it any more."""
    Riding.delete().where(Riding.bouncer_batch == ledger_id).execute()


def unsend_rows(ledger_id):
    """Rows of a reservation that was never sent go back in line where they were (the ledger
    keeps no trace of it, so the rows do not name it). Returns what `requeue_rows_of` does."""
    return requeue_rows_of([ledger_id], name_attempt=False)


def requeue_rows_of(ledger_ids, name_attempt=True):
    """Rows riding on failed attempts (`ledger_ids`: ids or a subquery) go back in line where
    they were; `bouncer_batch` names the last attempt that carried them. A row whose user
    batch's cancel was asked for does not: no verdict came for it, and none is wanted now.
    Returns (how many went back, {user batch: ids of its rows left out of the line, still
    queued})."""
    back, unwanted = [], {}
    for ledger_id, row_ids in riding_rows_of(ledger_ids).items():
        for part in chunked(row_ids):
            rows = (Row.select(*[row for _, row in LINE_COPIES], UserBatch.user_id, UserBatch.cancelled_at)
                    .join(UserBatch).where(among(Row.id, part) & (Row.status == RowState.QUEUED)).tuples())
            for *row, cancelled_at in database.execute_sql(*rows.sql()).fetchall():
                if cancelled_at is None:
                    back.append(tuple(row))
                else:
                    unwanted.setdefault(row[AT["batch_id"]], []).append(row[0])
            if name_attempt:
                Row.update(bouncer_batch=ledger_id).where(among(Row.id, part)).execute()
    lock_batches(unwanted)      # the batches the unwanted rows end, before the line's lock
    return_to_line(back)
    Riding.delete().where(is_one_of(Riding.bouncer_batch, ledger_ids)).execute()
    return len(back), unwanted


def ledgers_ridden_by(batch_ids):
    """The ids of the Bouncer batches rows of these user batches ride on."""
    query = Riding.select(Riding.bouncer_batch).distinct().where(is_one_of(Riding.batch_id, batch_ids))
    return [ledger_id for (ledger_id,) in query.tuples()]


def take_off_batch(batch_id):
    """Every row of the user batch riding on a Bouncer batch stops riding (its batch is being
    erased); returns {ledger id: [ids of the rows taken off it]}."""
    taken = Riding.delete().where(Riding.batch_id == batch_id).returning(Riding.bouncer_batch, Riding.row_ids)
    found = {}
    for ledger_id, row_ids in database.execute_sql(*taken.sql()).fetchall():
        found.setdefault(ledger_id, []).extend(json.loads(row_ids))
    return found


def take_off_rows(batch_id, row_ids):
    """These rows of the user batch stop riding (they are being erased); the rows riding beside
    them ride on. Returns {ledger id: [ids of the rows taken off it]}."""
    doomed, taken = set(row_ids), {}
    for riding_id, ledger_id, ids in (Riding.select(Riding.id, Riding.bouncer_batch, Riding.row_ids)
                                      .where(Riding.batch_id == batch_id).tuples()):
        ids = json.loads(ids)
        left = [r for r in ids if r not in doomed]
        if len(left) == len(ids):
            continue
        taken.setdefault(ledger_id, []).extend(r for r in ids if r in doomed)
        if left:
            (Riding.update(row_ids="[%s]" % ",".join(map(str, left)), rows=len(left))
             .where(Riding.id == riding_id).execute())
        else:
            Riding.delete().where(Riding.id == riding_id).execute()
    return taken
def requeue_for_recheck(ledger_id, due, max_rechecks):
    """Rows riding on this batch whose address Bouncer asked to be tried again (`due`: {email
    global id: not before}) and that were re-checked fewer than `max_rechecks` times go back in
    line where they were, not to be sent before that time (unless their user batch's cancel was
    asked for). Returns their ids."""
    if not due or not max_rechecks:
        return []
    due_rows = (Row.id.in_(riding_rows(ledger_id)) & (Row.status == RowState.QUEUED)
                & among(Row.email_global, list(due)) & (Row.rechecks < max_rechecks))
    # Their user batches first (lock_batches): a cancel under way ends before they are read, so
    # none goes back in line after its batch's cancel.
    lock_batches([b for (b,) in Row.select(Row.batch).distinct().where(due_rows).tuples()])
    # A row whose user batch's cancel was asked for is not sent again: it ends with the unknown.
    back = (Row.select(*[row for _, row in LINE_COPIES], UserBatch.user_id)
            .join(UserBatch, on=(UserBatch.id == Row.batch))
            .where(due_rows & UserBatch.cancelled_at.is_null()).tuples())
    rechecks = AT["rechecks"]
    back = [row[:rechecks] + (row[rechecks] + 1,) + tuple(row[rechecks + 1:])
            for row in database.execute_sql(*back.sql()).fetchall()]
    return_to_line(back, not_before=due)
    row_ids = [row[0] for row in back]
    for part in chunked(row_ids):
        Row.update(rechecks=Row.rechecks + 1, bouncer_batch=ledger_id).where(among(Row.id, part)).execute()
    return row_ids


def any_riding_on(ledger_ids):
    """Whether a row still rides on one of `ledger_ids` (what `requeue_rows_of` would queue)."""
    return Riding.select().where(is_one_of(Riding.bouncer_batch, ledger_ids)).exists()


def batches_riding_on(ledger_id):
    """The ids of the user batches with a row riding on this Bouncer batch."""
    return [b for (b,) in batches_of_bouncer_batch(ledger_id).tuples()]


def batches_of_bouncer_batch(ledger_id):
    """The user batches with a row riding on this Bouncer batch."""
    return Riding.select(Riding.batch_id).distinct().where(Riding.bouncer_batch == ledger_id)


def is_one_of(column, values):
    """`column` in `values`: a subquery, or a collection of ids."""
    if isinstance(values, Query):
        return column.in_(values)
    return among(column, values)

