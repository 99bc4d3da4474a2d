"""The doors in, and admission: how user batches become queued work.

Every door writes a user batch the way a host application does, `user_batches (user_id,
check_type)` and `user_batch_emails (batch_id, position, email)`, and admission turns what was
written into work for the queue. Three doors, one path:
- the SQL door: a host writes the rows itself; the queue admits them on its own;
- `submit` and `create_user_batch`, and the HTTP API: a `Loader` writes the rows in committed
  slices while the batch is `loading` (invisible to the queue, so a million rows never hold the
  database for long), then makes it visible in one step and admits it at once, to report what
  it holds.

Admission, a bounded slice at a time, oldest batch first: a batch that became visible takes its
place in line (`fifo_order`, from a counter, so in commit order); each new row is checked
(syntax, with email-validator), stripped of its modifiers, mapped to its `emails_global` row,
and becomes `queued` (or `invalid` with the reason); the batch's counts follow. Everything is
a conditional update of rows still `new`, so two admitters at once never admit a row twice;
and one admitter at a time works on a batch (a loader on its own, a cycle on a host's, which it
claims), so two never check and write the same rows only for one of them to find them taken.
"""

import datetime
import logging
import time
from dataclasses import dataclass, field

from peewee import fn

from bouncer.addresses import strip_email_modifiers, syntax_error
from bouncer.logs import ids
from bouncer.names import ADDRESSES_LOCK
from bouncer.queue import line, progress
from bouncer.queue.line import take_places
from bouncer.states import BatchState
from bouncer.store.bulk import among
from bouncer.store.database import database, dialect, lock_rows_for_change, serialize_on, utcnow, write_transaction
from bouncer.store.models import EmailGlobal, UserBatch, UserBatchEmail

log = logging.getLogger(__name__)

Row = UserBatchEmail
SLICE = 5000                  # rows a loader commits at once, and rows admitted at once


MAX_STORED_EMAIL = 320        # characters of a submitted line kept (an address is at most 254)
# A loader commits a slice every fraction of a second; one silent for this long died.
DEAD_LOADER_AFTER = datetime.timedelta(minutes=5)
# A cycle admitting a host's batch renews its claim with every slice (a fraction of a second);
# one silent for this long died, and the next admitter takes the batch over.
DEAD_ADMITTER_AFTER = datetime.timedelta(seconds=30)


def row_problem(text):
    """None for a valid address, else why it is not one."""
    if not text:
        return "the address is empty"
    if len(text) > MAX_STORED_EMAIL:
        return "the line is too long to be an address"
    return syntax_error(text)


def remove_loading_batch(batch_id):
    """Delete a batch still `loading` and its rows, a slice of rows per transaction."""
    while True:
        with write_transaction():
            doomed = [i for (i,) in Row.select(Row.id).where(Row.batch == batch_id).limit(SLICE).tuples()]
            if not doomed:
                UserBatch.delete().where((UserBatch.id == batch_id)
                                         & (UserBatch.status == BatchState.LOADING)).execute()
                return
            Row.delete().where(among(Row.id, doomed)).execute()


def is_admitted(batch_id):
    """Whether a visible batch's admission has ended, so its counts are final: its loader's
    heartbeat is cleared with the duplicates' count (finish_admission), whoever admitted it."""
    batch = UserBatch.get_or_none(UserBatch.id == batch_id)
    return (batch is not None and batch.status not in (BatchState.LOADING, BatchState.NEW)
            and batch.loader_seen_at is None)


def remove_dead_loads(now=None):
    """Remove the batches of our loaders that died mid-load (silent for DEAD_LOADER_AFTER).
    A host's own `loading` batches have no heartbeat and are never touched. Returns their ids."""
    silent_since = (now or utcnow()) - DEAD_LOADER_AFTER
    dead = [b for (b,) in UserBatch.select(UserBatch.id).where(
        (UserBatch.status == BatchState.LOADING) & (UserBatch.loader_seen_at < silent_since)).tuples()]
    for batch_id in dead:
        log.warning("User batch %s: its loader died mid-load; removing what it wrote", batch_id,
                    extra=ids(user_batch_id=batch_id))
        remove_loading_batch(batch_id)
    return dead


@dataclass
class AdmissionReport:
    noticed: int = 0          # batches that took their place in line
    admitted: int = 0         # rows queued
    invalid: int = 0          # rows found invalid
    failed: list = field(default_factory=list)    # (batch id, reason): nothing to send
    removed: list = field(default_factory=list)   # batches of dead loaders removed
    unfinished: bool = False  # stopped at its bound with new rows left
    last_position: int = 0    # of the last row a slice looked at

    def summary(self):
        parts = ["%d row(s) admitted, %d invalid" % (self.admitted, self.invalid)]
        if self.noticed:
            parts.append("%d batch(es) joined the line" % self.noticed)
        if self.failed:
            parts.append("%d batch(es) failed" % len(self.failed))
        if self.removed:
            parts.append("%d dead load(s) removed" % len(self.removed))
        return "; ".join(parts)

    def add(self, other):
        self.admitted += other.admitted
        self.invalid += other.invalid
        self.failed += other.failed


def admit(check_type, max_rows=None, deadline=None, now=None, report=None, should_stop=None):
    """Admit what is new for `check_type`, oldest batch first, a slice at a time, until nothing
    is left, `max_rows` were looked at, or the monotonic `deadline` passed. Returns the report."""
    report = report or AdmissionReport()
    now = now or utcnow()
    report.removed += remove_dead_loads(now)
    report.noticed += notice_new_batches(check_type, report, now)
    looked_at = 0
    for batch_id in batches_with_new_rows(check_type, now):
        if not claim_admission(batch_id, now):
            continue     # another admitter is at work on it
        admitted = AdmissionReport()
        try:
            while True:
                if ((max_rows is not None and looked_at >= max_rows)
                        or (deadline is not None and time.monotonic() > deadline)
                        or (should_stop and should_stop())):
                    report.unfinished = True
                    return report
                admitted = admit_slice(batch_id, now, limit=SLICE, after=admitted.last_position,
                                       heartbeat=UserBatch.admitter_seen_at)
                report.add(admitted)
                looked_at += admitted.admitted + admitted.invalid
                if admitted.admitted + admitted.invalid < SLICE:
                    break
        finally:
            release_admission(batch_id)
    return report


def claim_admission(batch_id, now):
    """Whether this admitter may work on a host's batch: it claims it unless another admitter's
    claim is alive (renewed within DEAD_ADMITTER_AFTER). A claim only saves work: every write is
    conditional on rows still `new`, so an admitter that lost its claim still admits no row
    twice."""
    alive_since = now - DEAD_ADMITTER_AFTER
    with write_transaction():
        return bool(UserBatch.update(admitter_seen_at=utcnow()).where(
            (UserBatch.id == batch_id)
            & (UserBatch.admitter_seen_at.is_null() | (UserBatch.admitter_seen_at < alive_since))).execute())


def release_admission(batch_id):
    """The batch is free for the next admitter (this one stopped at its bound, or is done)."""
    with write_transaction():
        UserBatch.update(admitter_seen_at=None).where(UserBatch.id == batch_id).execute()


def admit_batch(batch_id, now=None, heartbeat=None, checked=None):
    """Admit every new row of one batch (a loader admitting what it just wrote, renewing its
    heartbeat, the column `heartbeat`, with each slice; `checked`, see admit_slice)."""
    now = now or utcnow()
    report, admitted = AdmissionReport(), AdmissionReport()
    while True:
        admitted = admit_slice(batch_id, now, limit=SLICE, heartbeat=heartbeat, checked=checked,
                               after=admitted.last_position)
        report.add(admitted)
        if admitted.admitted + admitted.invalid < SLICE:
            return report


def notice_new_batches(check_type, report, now):
    """Batches a host made visible (status `new`) take their place in line, oldest first; one
    without a single row ends failed. With none to notice, a read says so and no write lock is
    taken."""
    new = UserBatch.select(UserBatch.id).where(
        (UserBatch.status == BatchState.NEW) & (UserBatch.check_type == check_type)).order_by(UserBatch.id)
    if not new.exists():
        return 0
    with write_transaction():
        fresh = [b for (b,) in new.tuples()]
        if not fresh:
            return 0
        for batch_id, place in zip(fresh, take_places(len(fresh))):
            UserBatch.update(status=BatchState.QUEUED, fifo_order=place).where(UserBatch.id == batch_id).execute()
        empty = [b for b in fresh if not Row.select().where(Row.batch == b).exists()]
        for batch_id in empty:
            fail_batch_without_work(batch_id, "the user batch has no rows", report, now)
    return len(fresh)


def batches_with_new_rows(check_type, now=None):
    """Visible batches of `check_type` with rows not yet admitted, in their order in line,
    except those a live loader is admitting itself. The rows are found by a skip scan of the
    index of new rows, one probe per batch, so a large batch still loading costs nothing here.
    Those another admitter has claimed are left to it."""
    now = now or utcnow()
    first = database.execute_sql(DISTINCT_NEW_BATCHES).fetchall()
    batch_ids = [b for (b,) in first]
    if not batch_ids:
        return []
    loader_alive_since = now - DEAD_LOADER_AFTER
    visible = (UserBatch.select(UserBatch.id)
               .where(among(UserBatch.id, batch_ids) & (UserBatch.check_type == check_type)
                      & UserBatch.status.not_in((BatchState.LOADING, BatchState.NEW))
                      & (UserBatch.loader_seen_at.is_null() | (UserBatch.loader_seen_at < loader_alive_since))
                      & (UserBatch.admitter_seen_at.is_null()
                         | (UserBatch.admitter_seen_at < now - DEAD_ADMITTER_AFTER)))
               .order_by(UserBatch.fifo_order, UserBatch.id))
    return [b for (b,) in visible.tuples()]


DISTINCT_NEW_BATCHES = """
WITH RECURSIVE pending(batch_id) AS (
    SELECT MIN(batch_id) FROM user_batch_emails WHERE %(new)s
    UNION ALL
    SELECT (SELECT MIN(batch_id) FROM user_batch_emails WHERE %(new)s AND batch_id > pending.batch_id)
    FROM pending WHERE pending.batch_id IS NOT NULL
)
SELECT batch_id FROM pending WHERE batch_id IS NOT NULL
""" % {"new": line.NOT_ADMITTED_SQL}


def admit_slice(batch_id, now, limit=SLICE, heartbeat=None, checked=None, after=0):
    """Admit up to `limit` new rows of one batch, oldest position first, after position `after`
    (where the slice before ended: on PostgreSQL the index of rows not yet admitted keeps an
    entry for each row admitted until a vacuum, and a scan from the batch's first position
    would step over them all, slice after slice). The addresses are checked before the write
    transaction opens, so it stays short. `checked`: what the loader that wrote the rows found,
    by position (see Loader.classify), so a valid address is not checked twice (an invalid one
    is checked again for its reason). `heartbeat`: the column of the admitter's heartbeat or
    claim, renewed with the slice."""
    report = AdmissionReport()
    rows = rows_to_admit(batch_id, after, limit)
    if not rows:
        if after:     # the slice before was full and took the last rows: the batch is admitted
            finish_admission(batch_id, report, now)
        return report
    report.last_position = rows[-1][1]
    valid, invalid = [], []
    known = len(checked) if checked is not None else 0
    for row_id, position, text in rows:
        text = (text or "").strip()
        problem = None if 0 < position <= known and checked[position - 1] else row_problem(text)
        if problem is None:
            valid.append((row_id, position, strip_email_modifiers(text)))
        else:
            invalid.append((row_id, position, problem))
    with write_transaction():
        # Before any row is written: an erasure removing an address waits for this slice, or
        # this slice for it, so no row ever names an address removed meanwhile.
        serialize_on(ADDRESSES_LOCK, shared=True)
        # The batch before its rows, as every writer takes them (line.lock_batches).
        batch = lock_rows_for_change(UserBatch.select().where(UserBatch.id == batch_id)).first()
        if batch is None:   # erased since its rows were read: nothing left to admit
            return report
        if batch.status == BatchState.CANCELLED:
            report.invalid = progress.cancel_unadmitted(batch, now, [r for r, _, _ in rows])
            return report
        global_ids = register_addresses([address for _, _, address in valid], now)
        report.admitted = queue_rows(batch, [(r, p, global_ids[a]) for r, p, a in valid])
        report.invalid = mark_invalid(batch, invalid, now)
        count_admitted(batch, report)
        if heartbeat is not None:
            UserBatch.update({heartbeat: utcnow()}).where(UserBatch.id == batch_id).execute()
    if len(rows) < limit:
        finish_admission(batch_id, report, now)
    return report


def rows_to_admit(batch_id, after, limit):
    """Up to `limit` rows `(id, position, email)` of the batch not yet admitted, after position
    `after`, in order of position. They are read a window of `limit` positions at a time (the
    next window starting at the next row not yet admitted, when the batch has a gap), so a read
    costs at most a window whatever plan the database picks. Without the window, PostgreSQL,
    with statistics taken while a large batch was loading (no position beyond the first rows),
    guessed a dozen rows past the last one it knew and read every row left in the batch at each
    slice, then sorted them for the first 5,000: a 1M-line submit took 53 to 63 s, not 29 to 32."""
    rows, start = [], after
    while True:
        window = window_to_admit(batch_id, start, limit, limit - len(rows))
        rows += database.execute_sql(*window.sql()).fetchall()
        if len(rows) == limit:
            return rows
        following = (Row.select(fn.MIN(Row.position))
                     .where((Row.batch == batch_id) & (Row.position > start + limit) & line.not_admitted())
                     .scalar())
        if following is None:
            return rows
        start = following - 1


def window_to_admit(batch_id, after, width, limit):
    """The first `limit` rows not yet admitted among the `width` positions after `after`."""
    return (Row.select(Row.id, Row.position, Row.email)
            .where((Row.batch == batch_id) & (Row.position > after) & (Row.position <= after + width)
                   & line.not_admitted())
            .order_by(Row.position).limit(limit).tuples())


def register_addresses(addresses, now):
    """{stripped address: emails_global id}, creating the rows that do not exist yet."""
    unique = sorted(set(addresses))  # sorted: concurrent admitters take row locks in one order
    if not unique:
        return {}
    ids = dialect().create_addresses(database, unique, now)
    unknown = [address for address in unique if address not in ids]
    if unknown:
        query = EmailGlobal.select(EmailGlobal.id, EmailGlobal.email).where(among(EmailGlobal.email, unknown))
        ids.update((email, gid) for gid, email in database.execute_sql(*query.sql()).fetchall())
    return ids


def queue_rows(batch, rows):
    """Rows (id, position, email_global id) still new become queued, in the batch's place in
    line, and join the line, taking their turns (line.joining_line)."""
    if not rows:
        return 0
    joining, renumber_from = line.joining_line(batch, rows[0][1])
    admitted = update_new_rows(
        batch, rows, "email_global_id",
        "status = 'queued', check_type = %s, fifo_order = %s" % (database.param, database.param),
        (batch.check_type, batch.fifo_order), joining)
    line.after_joining(batch, renumber_from)
    return admitted


def mark_invalid(batch, rows, now):
    """Rows (id, position, reason) still new become invalid, with their reason."""
    if not rows:
        return 0
    return update_new_rows(batch, rows, "failure_reason",
                           "status = 'invalid', check_type = %s, completed_at = %s" % (database.param, database.param),
                           (batch.check_type, now))


def update_new_rows(batch, rows, column, assignments, params, joining=None):
    """One UPDATE of the rows `(id, position, value)` of `batch` that are still new: `column`
    takes the value, `assignments` (SQL with placeholders for `params`) the rest. With `joining`
    (line.joining_line), the rows it changed join the line. Returns how many changed."""
    return dialect().update_new_rows(database, batch.id, rows, column, assignments, params, joining)


def count_admitted(batch, report):
    """The batch's counts take the rows just admitted; an ended batch that got new work back
    is open again."""
    changes = {UserBatch.total: UserBatch.total + report.admitted + report.invalid,
               UserBatch.invalid: UserBatch.invalid + report.invalid}
    if report.admitted and batch.status == BatchState.COMPLETED:
        changes.update({UserBatch.status: BatchState.PROCESSING, UserBatch.completed_at: None})
    UserBatch.update(changes).where(UserBatch.id == batch.id).execute()


def finish_admission(batch_id, report, now):
    """Nothing new is left in the batch: count its duplicates (read apart from any write
    transaction: over a million rows it takes a while) and end it when nothing is to be sent."""
    valid, distinct = (Row.select(fn.COUNT(Row.email_global), fn.COUNT(Row.email_global.distinct()))
                       .where(Row.batch == batch_id).scalar(as_tuple=True))
    with write_transaction():
        # The loader's heartbeat goes with it: the batch's counts are final from here on.
        UserBatch.update(duplicates=valid - distinct, loader_seen_at=None).where(UserBatch.id == batch_id).execute()
        batch = UserBatch.get_or_none(UserBatch.id == batch_id)
        if batch is None:   # erased meanwhile
            return
        if valid == 0 and batch.status in (BatchState.QUEUED, BatchState.PROCESSING):
            fail_batch_without_work(batch_id, "no valid address in %d row(s)" % batch.total, report, now)
        else:
            progress.complete_finished_batches([batch_id], now)


def fail_batch_without_work(batch_id, reason, report, now):
    progress.fail_batches([batch_id], reason, now)
    report.failed.append((batch_id, reason))
    log.warning("User batch %s failed: %s", batch_id, reason, extra=ids(user_batch_id=batch_id))

