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
a conditional update of rows still `new`, so two admitters at once (a cycle and a loader) never
admit a row twice.
"""
import datetime
import json
import logging
import time
from dataclasses import dataclass, field

from peewee import fn

from . import progress
from .addresses import strip_email_modifiers, syntax_error
from .config import CHECK_TYPES
from .db import among, bulk_insert, database, insert_tuples, is_postgres, postgres_array, utcnow, write_transaction
from .errors import InputError
from .logs import ids
from .models import (
    BATCH_CANCELLED, BATCH_COMPLETED, BATCH_LOADING, BATCH_NEW, BATCH_PROCESSING, BATCH_QUEUED,
    EmailGlobal, FifoCounter, UserBatch, UserBatchEmail,
)

log = logging.getLogger(__name__)

SLICE = 5000                  # rows a loader commits at once, and rows admitted at once
MAX_REPORTED_INVALID = 10     # invalid rows named back to the submitter
MAX_USER_ID = 200
MAX_ECHO = 80                 # characters of a submitted value echoed in a message
MAX_STORED_EMAIL = 320        # characters of a submitted line kept (an address is at most 254)
# A loader commits a slice every fraction of a second; one silent for this long died.
DEAD_LOADER_AFTER = datetime.timedelta(minutes=5)
Row = UserBatchEmail


# == our doors: loading in slices, then visible in one step ==================================

@dataclass
class SubmitSummary:
    batch_id: int
    accepted: int = 0
    invalid: int = 0
    duplicates: int = 0
    invalid_examples: list = field(default_factory=list)   # (line, address, why), the first few

    def as_json(self):
        return {"batch_id": self.batch_id, "accepted": self.accepted,
                "invalid": self.invalid, "duplicates": self.duplicates}


def create_user_batch(user_id, check_type, emails, now=None, on_progress=None, source="library",
                      callback_url=None):
    """Create one user batch from `emails` and return its SubmitSummary, once it is admitted.

    `emails` is any iterable of address strings, or of `(line_number, address)` pairs (line
    numbers then name the invalid rows). Raises InputError, leaving nothing visible, for an
    unknown check type, a bad user id, or input without a single valid address."""
    loader = Loader(user_id, check_type, source=source, callback_url=callback_url, now=now)
    with loader:
        for chunk in chunks(numbered(emails), SLICE):
            loader.write(chunk)
            if on_progress:
                on_progress(len(chunk))
        loader.check_has_valid_row()
        return loader.finish()


class Loader:
    """Writes one user batch in committed slices while it is `loading`. `finish()` makes it
    visible and admits it; leaving the `with` block any other way removes what was written.
    A loader that died (kill -9) is told from a slow one by its heartbeat (`loader_seen_at`,
    renewed with every slice): after DEAD_LOADER_AFTER of silence a cycle removes its rows."""

    def __init__(self, user_id, check_type, source, callback_url=None, now=None):
        check_submission(user_id, check_type)
        self.check_type = check_type
        self.rows = 0
        self.summary = None
        self.valid = 0
        self.checked = bytearray()   # by position - 1: 1 where the row is a valid address
        self.invalid_examples = []
        self.invalid = 0
        now = now or utcnow()
        with write_transaction():
            self.batch = UserBatch.create(user_id=str(user_id).strip(), check_type=check_type,
                                          status=BATCH_LOADING, source=source, callback_url=callback_url,
                                          created_at=now, loader_seen_at=now)
        self.batch_id = self.batch.id

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.summary is None:
            try:
                self.remove()
            except Exception as failure:
                # The database that failed the load may fail its removal too (a full disk): the
                # batch stays invisible, and a cycle removes it once its heartbeat is old.
                log.debug("User batch %s: what the failed load wrote stays invisible until a cycle "
                            "removes it (%s)", self.batch_id, failure, extra=ids(user_batch_id=self.batch_id))
        return False

    def write(self, numbered_rows):
        """Write one slice of `(line, text)` rows, committed."""
        values = []
        for line, text in numbered_rows:
            self.rows += 1
            text = clean_text(text)
            self.classify(line, text)
            values.append((self.batch_id, self.rows, text))
        with write_transaction():
            bulk_insert_rows(values)
            UserBatch.update(loader_seen_at=utcnow()).where(UserBatch.id == self.batch_id).execute()

    def classify(self, line, text):
        problem = row_problem(text)
        self.checked.append(problem is None)
        if problem is None:
            self.valid += 1
            return
        self.invalid += 1
        if len(self.invalid_examples) < MAX_REPORTED_INVALID:
            self.invalid_examples.append((line, echo(text), problem))

    def check_has_valid_row(self):
        if self.valid == 0:
            raise InputError(no_valid_address_message(self.invalid, self.invalid_examples))

    def finish(self, now=None, before_visible=None, callback_url=None):
        """Make the batch visible (it takes its place in line now), admit it, and return what
        it holds. `before_visible()` runs inside the transaction that makes it visible."""
        now = now or utcnow()
        with write_transaction():
            if before_visible is not None:
                before_visible()
            place = take_places(1)[0]
            # The heartbeat goes on while the loader admits its batch: cycles leave it to the
            # loader meanwhile (two admitters of one batch would only take turns at the lock).
            changes = {UserBatch.status: BATCH_QUEUED, UserBatch.fifo_order: place,
                       UserBatch.loader_seen_at: utcnow()}
            if callback_url is not None:
                changes[UserBatch.callback_url] = callback_url
            (UserBatch.update(changes)
             .where((UserBatch.id == self.batch_id) & (UserBatch.status == BATCH_LOADING)).execute())
        admit_batch(self.batch_id, now, heartbeat=True, checked=self.checked)
        UserBatch.update(loader_seen_at=None).where(UserBatch.id == self.batch_id).execute()
        batch = UserBatch.get_by_id(self.batch_id)
        self.summary = SubmitSummary(self.batch_id, accepted=batch.total - batch.invalid,
                                     invalid=batch.invalid, duplicates=batch.duplicates,
                                     invalid_examples=self.invalid_examples[:MAX_REPORTED_INVALID])
        log.info("User batch %s created for %r (%s): %s accepted, %s invalid, %s duplicates",
                 self.batch_id, str(self.batch.user_id)[:MAX_ECHO], self.check_type,
                 self.summary.accepted, self.summary.invalid, self.summary.duplicates,
                 extra=ids(user_batch_id=self.batch_id))
        return self.summary

    def remove(self):
        """Take away everything this loader wrote (it was never visible)."""
        remove_loading_batch(self.batch_id)


def check_submission(user_id, check_type):
    if check_type not in CHECK_TYPES:
        raise InputError("unknown check type %r: use one of %s" % (echo(str(check_type)), ", ".join(CHECK_TYPES)))
    user_id = "" if user_id is None else str(user_id)
    if not user_id.strip():
        raise InputError("a user id is required (--user)")
    if len(user_id) > MAX_USER_ID:
        raise InputError("the user id is %d characters long; at most %d" % (len(user_id), MAX_USER_ID))
    if any(ord(c) < 32 or ord(c) == 127 for c in user_id):
        raise InputError("the user id %r holds a control character (a newline, a tab...); "
                         "use printable characters only" % echo(user_id))


def numbered(emails):
    """(line, address) pairs from either plain addresses or pairs."""
    for index, item in enumerate(emails, start=1):
        if isinstance(item, tuple):
            yield item
        else:
            yield index, item


def chunks(iterable, size):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def clean_text(text):
    """The row as stored: surrounding space dropped, a NUL (which a Postgres text column cannot
    hold) written out, and a line longer than any address cut (it is invalid anyway)."""
    text = (text or "").strip().replace("\x00", "\\x00")
    return text if len(text) <= MAX_STORED_EMAIL else text[:MAX_STORED_EMAIL] + "..."


def row_problem(text):
    """None for a valid address, else why it is not one."""
    if not text:
        return "the address is empty"
    if len(text) > MAX_STORED_EMAIL:
        return "the line is too long to be an address"
    return syntax_error(text)


def echo(text):
    """A submitted value fit for a message: never a whole 5 MB line."""
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "..."


def no_valid_address_message(invalid, examples):
    if not examples:
        return "no addresses found: the input is empty"
    line, text, problem = examples[0]
    return "no valid address in %s row(s); first: line %s: %r: %s" % (invalid, line, text, problem)


def bulk_insert_rows(values):
    """Rows as a host writes them: (batch id, position, email); the rest takes its defaults."""
    insert_tuples(Row, ("batch", "position", "email"), values)


def remove_loading_batch(batch_id):
    """Delete a batch still `loading` and its rows, a slice of rows per transaction."""
    while True:
        with write_transaction():
            doomed = [i for (i,) in Row.select(Row.id).where(Row.batch == batch_id).limit(SLICE).tuples()]
            if not doomed:
                UserBatch.delete().where((UserBatch.id == batch_id)
                                         & (UserBatch.status == BATCH_LOADING)).execute()
                return
            Row.delete().where(among(Row.id, doomed)).execute()


def remove_dead_loads(now=None):
    """Remove the batches of our loaders that died mid-load (silent for DEAD_LOADER_AFTER).
    A host's own `loading` batches have no heartbeat and are never touched. Returns their ids."""
    silent_since = (now or utcnow()) - DEAD_LOADER_AFTER
    dead = [b for (b,) in UserBatch.select(UserBatch.id).where(
        (UserBatch.status == BATCH_LOADING) & (UserBatch.loader_seen_at < silent_since)).tuples()]
    for batch_id in dead:
        log.warning("User batch %s: its loader died mid-load; removing what it wrote", batch_id,
                    extra=ids(user_batch_id=batch_id))
        remove_loading_batch(batch_id)
    return dead


def take_places(count):
    """The next `count` places in line. Inside a write transaction: the counter row stays
    locked until commit, so places are given in the order batches become visible."""
    if is_postgres():
        (last,) = database.execute_sql(
            "UPDATE fifo_counter SET last = last + %s RETURNING last", (count,)).fetchone()
    else:
        FifoCounter.update(last=FifoCounter.last + count).execute()
        last = FifoCounter.select(FifoCounter.last).scalar()
    return list(range(last - count + 1, last + 1))


# == admission ===============================================================================

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
        admitted = AdmissionReport()
        while True:
            if ((max_rows is not None and looked_at >= max_rows)
                    or (deadline is not None and time.monotonic() > deadline)
                    or (should_stop and should_stop())):
                report.unfinished = True
                return report
            admitted = admit_slice(batch_id, now, limit=SLICE, after=admitted.last_position)
            report.add(admitted)
            looked_at += admitted.admitted + admitted.invalid
            if admitted.admitted + admitted.invalid < SLICE:
                break
    return report


def admit_batch(batch_id, now=None, heartbeat=False, checked=None):
    """Admit every new row of one batch (a loader admitting what it just wrote, renewing its
    heartbeat with each slice; `checked`, see admit_slice)."""
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
        (UserBatch.status == BATCH_NEW) & (UserBatch.check_type == check_type)).order_by(UserBatch.id)
    if not new.exists():
        return 0
    with write_transaction():
        fresh = [b for (b,) in new.tuples()]
        if not fresh:
            return 0
        for batch_id, place in zip(fresh, take_places(len(fresh))):
            UserBatch.update(status=BATCH_QUEUED, fifo_order=place).where(UserBatch.id == batch_id).execute()
        empty = [b for b in fresh if not Row.select().where(Row.batch == b).exists()]
        for batch_id in empty:
            fail_batch_without_work(batch_id, "the user batch has no rows", report, now)
    return len(fresh)


def batches_with_new_rows(check_type, now=None):
    """Visible batches of `check_type` with rows not yet admitted, in their order in line,
    except those a live loader is admitting itself. The rows are found by a skip scan of the
    index of new rows, one probe per batch, so a large batch still loading costs nothing here."""
    first = database.execute_sql(DISTINCT_NEW_BATCHES).fetchall()
    batch_ids = [b for (b,) in first]
    if not batch_ids:
        return []
    loader_alive_since = (now or utcnow()) - DEAD_LOADER_AFTER
    visible = (UserBatch.select(UserBatch.id)
               .where(among(UserBatch.id, batch_ids) & (UserBatch.check_type == check_type)
                      & UserBatch.status.not_in((BATCH_LOADING, BATCH_NEW))
                      & (UserBatch.loader_seen_at.is_null() | (UserBatch.loader_seen_at < loader_alive_since)))
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
""" % {"new": progress.NOT_ADMITTED_SQL}


def admit_slice(batch_id, now, limit=SLICE, heartbeat=False, checked=None, after=0):
    """Admit up to `limit` new rows of one batch, oldest position first, after position `after`
    (where the slice before ended: on PostgreSQL the index of rows not yet admitted keeps an
    entry for each row admitted until a vacuum, and a scan from the batch's first position
    would step over them all, slice after slice). The addresses are checked before the write
    transaction opens, so it stays short. `checked`: what the loader that wrote the rows found,
    by position (see Loader.classify), so a valid address is not checked twice (an invalid one
    is checked again for its reason)."""
    report = AdmissionReport()
    rows = (Row.select(Row.id, Row.position, Row.email)
            .where((Row.batch == batch_id) & (Row.position > after) & progress.not_admitted())
            .order_by(Row.position).limit(limit).tuples())
    rows = database.execute_sql(*rows.sql()).fetchall()
    if not rows:
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
        batch = UserBatch.get_by_id(batch_id)
        if batch.status == BATCH_CANCELLED:
            report.invalid = progress.cancel_unadmitted(batch, now, [r for r, _, _ in rows])
            return report
        global_ids = register_global_emails([address for _, _, address in valid], now)
        report.admitted = queue_rows(batch, [(r, p, global_ids[a]) for r, p, a in valid])
        report.invalid = mark_invalid(batch, invalid, now)
        count_admitted(batch, report)
        if heartbeat:
            UserBatch.update(loader_seen_at=utcnow()).where(UserBatch.id == batch_id).execute()
    if len(rows) < limit:
        finish_admission(batch_id, report, now)
    return report


def register_global_emails(addresses, now):
    """{stripped address: emails_global id}, creating the rows that do not exist yet."""
    unique = sorted(set(addresses))  # sorted: concurrent admitters take row locks in one order
    if not unique:
        return {}
    if is_postgres():
        # One statement creates the new rows and names them; only the addresses known before
        # are looked up (an address another admitter created meanwhile among them).
        array, params = postgres_array(unique)
        ids = {email: gid for gid, email in database.execute_sql(
            "INSERT INTO emails_global (email, created_at) SELECT unnest(%s), %%s ON CONFLICT DO NOTHING"
            " RETURNING id, email" % array, params + [now]).fetchall()}
        unique = [address for address in unique if address not in ids]
    else:
        ids = {}
        bulk_insert(EmailGlobal, [{"email": a, "created_at": now} for a in unique], ignore_existing=True)
    if unique:
        query = EmailGlobal.select(EmailGlobal.id, EmailGlobal.email).where(among(EmailGlobal.email, unique))
        ids.update((email, gid) for gid, email in database.execute_sql(*query.sql()).fetchall())
    return ids


def queue_rows(batch, rows):
    """Rows (id, position, email_global id) still new become queued, in the batch's place in
    line, and join the line."""
    if not rows:
        return 0
    return update_new_rows(
        batch, rows, "email_global_id",
        "status = 'queued', check_type = %s, fifo_order = %s" % (database.param, database.param),
        (batch.check_type, batch.fifo_order), into_line=True)


def mark_invalid(batch, rows, now):
    """Rows (id, position, reason) still new become invalid, with their reason."""
    if not rows:
        return 0
    return update_new_rows(batch, rows, "failure_reason",
                           "status = 'invalid', check_type = %s, completed_at = %s" % (database.param, database.param),
                           (batch.check_type, now))


def update_new_rows(batch, rows, column, assignments, params, into_line=False):
    """One UPDATE of the rows `(id, position, value)` of `batch` that are still new: `column`
    takes the value, `assignments` (SQL with placeholders for `params`) the rest. `into_line`:
    the rows it changed join the line. Returns how many changed."""
    if is_postgres():
        return update_new_rows_by_position(batch, rows, column, assignments, params, into_line)
    picks = "value ->> 1 AS %s" % column
    sql = ("UPDATE user_batch_emails SET %s, %s = v.%s FROM (SELECT value ->> 0 AS id, %s FROM json_each(?)) AS v"
           " WHERE user_batch_emails.id = v.id AND user_batch_emails.status = 'new'"
           % (assignments, column, column, picks))
    values = json.dumps([(row_id, value) for row_id, _, value in rows])
    if not into_line:
        return database.execute_sql(sql, list(params) + [values]).rowcount
    # The ids it changed, then their line rows copied by one INSERT ... SELECT: the line costs
    # 0.8 us a row this way, 4.4 us when every column came back to be bound again.
    admitted = [r for (r,) in database.execute_sql(sql + " RETURNING user_batch_emails.id",
                                                   list(params) + [values]).fetchall()]
    database.execute_sql("INSERT INTO queued_emails (%s) SELECT %s FROM user_batch_emails WHERE id IN"
                         " (SELECT value FROM json_each(?))"
                         % (", ".join(progress.LINE_TARGET), ", ".join(progress.LINE_SOURCE)), [json.dumps(admitted)])
    return len(admitted)


def update_new_rows_by_position(batch, rows, column, assignments, params, into_line):
    """PostgreSQL: the rows are found by one range of the batch's positions in the index of rows
    not yet admitted, and each takes its value by its position, found by a binary search of the
    positions given (`width_bucket`). Joined to the values by id instead, the plan rested on the
    table's statistics: taken when no row was new, they made the planner loop over every value
    for every row (measured: 4.3 s for 5,000 rows, where this takes tens of milliseconds
    whatever the statistics say)."""
    rows = sorted(rows, key=lambda row: row[1])
    positions, position_params = postgres_array([position for _, position, _ in rows])
    values, value_params = postgres_array([value for _, _, value in rows])
    index = "width_bucket(e.position, a.positions)"   # of the row's position among those given
    sql = ("UPDATE user_batch_emails AS e SET %s, %s = a.given[%s]"
           " FROM (SELECT %s AS positions, %s AS given) AS a"
           " WHERE e.batch_id = %%s AND e.position BETWEEN %%s AND %%s AND %s AND a.positions[%s] = e.position"
           % (assignments, column, index, positions, values, progress.NOT_ADMITTED_SQL, index))
    sql_params = list(params) + position_params + value_params + [batch.id, rows[0][1], rows[-1][1]]
    if into_line:
        sql = ("WITH admitted AS (%s RETURNING %s) INSERT INTO queued_emails (%s) SELECT * FROM admitted"
               % (sql, ", ".join("e." + c for c in progress.LINE_SOURCE), ", ".join(progress.LINE_TARGET)))
    return database.execute_sql(sql, sql_params).rowcount


def count_admitted(batch, report):
    """The batch's counts take the rows just admitted; an ended batch that got new work back
    is open again."""
    changes = {UserBatch.total: UserBatch.total + report.admitted + report.invalid,
               UserBatch.invalid: UserBatch.invalid + report.invalid}
    if report.admitted and batch.status == BATCH_COMPLETED:
        changes.update({UserBatch.status: BATCH_PROCESSING, UserBatch.completed_at: None})
    UserBatch.update(changes).where(UserBatch.id == batch.id).execute()


def finish_admission(batch_id, report, now):
    """Nothing new is left in the batch: count its duplicates (read apart from any write
    transaction: over a million rows it takes a while) and end it when nothing is to be sent."""
    valid, distinct = (Row.select(fn.COUNT(Row.email_global), fn.COUNT(Row.email_global.distinct()))
                       .where(Row.batch == batch_id).scalar(as_tuple=True))
    with write_transaction():
        UserBatch.update(duplicates=valid - distinct).where(UserBatch.id == batch_id).execute()
        batch = UserBatch.get_by_id(batch_id)
        if valid == 0 and batch.status in (BATCH_QUEUED, BATCH_PROCESSING):
            fail_batch_without_work(batch_id, "no valid address in %d row(s)" % batch.total, report, now)
        else:
            progress.complete_finished_batches([batch_id], now)


def fail_batch_without_work(batch_id, reason, report, now):
    progress.fail_batches([batch_id], reason, now)
    report.failed.append((batch_id, reason))
    log.warning("User batch %s failed: %s", batch_id, reason, extra=ids(user_batch_id=batch_id))

