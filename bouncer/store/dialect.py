"""The SQL that differs between SQLite and PostgreSQL, in one object per database, chosen when
the database opens (`store.database.dialect()`). Nothing outside the store asks which database
it runs on: it asks the dialect to do the thing.

Each method takes the open Peewee database `db` it works on. What is the same on both lives
with the code that uses it; only what differs is here.
"""
import contextlib
import datetime
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass

from peewee import SQL, OperationalError, fn

INT4 = 2 ** 31
# Multi-row INSERTs of up to MAX_PARAMS values: under SQLite's 32,766 bound parameters.
MAX_PARAMS = 30000
# SQLite: a writer waits this long for another process's transaction before giving up.
BUSY_TIMEOUT = 30
# SQLite: how often a writer asks again for the write lock another process holds.
WRITE_LOCK_POLL = 0.001


def quote(identifier):
    return '"%s"' % identifier


def sqlite_time(value):
    """A time as SQLite's adapter writes it, made once for a value every row shares rather than
    by the adapter for each row (measured: 5,000 new addresses inserted in 2.7 ms, 6.9 ms with a
    time to adapt in each row)."""
    return value.isoformat(" ") if isinstance(value, datetime.datetime) else value


def begin_when_free(db, transaction, patience=None):
    """Enter `transaction` (BEGIN IMMEDIATE) as soon as no other connection holds SQLite's write
    lock, asking every WRITE_LOCK_POLL seconds for up to `patience` seconds (by default the
    connection's own busy timeout, which is kept)."""
    (busy_ms,) = db.execute_sql("PRAGMA busy_timeout").fetchone()
    deadline = time.monotonic() + (busy_ms / 1000 if patience is None else patience)
    db.execute_sql("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                return transaction.__enter__()
            except OperationalError as busy:
                if "locked" not in str(busy) or time.monotonic() > deadline:
                    raise
                time.sleep(WRITE_LOCK_POLL)
    finally:
        db.execute_sql("PRAGMA busy_timeout = %d" % busy_ms)


class Sqlite:
    name = "sqlite"
    @contextlib.contextmanager
    def write_transaction(self, db):
        """A transaction that writes, taking the write lock at BEGIN, so that what it reads
        cannot change before it writes (two writers otherwise both read, then one fails). A
        BEGIN that finds the lock taken asks again every millisecond: SQLite's own busy
        handler sleeps in steps that grow to 100 ms, and a writer that commits and begins
        again within a few milliseconds (a loader's slices) would keep such a sleeper waiting
        for seconds. Nested, it is a savepoint of the transaction around it."""
        transaction = db.atomic("IMMEDIATE")
        if db.transaction_depth() > 0:
            with transaction as savepoint:
                yield savepoint
            return
        begun = begin_when_free(db, transaction)
        try:
            yield begun
        except BaseException as failure:
            transaction.__exit__(type(failure), failure, failure.__traceback__)
            raise
        transaction.__exit__(None, None, None)

    def serialize_on(self, db, name, shared=False):
        """Nothing to do: an IMMEDIATE transaction already serializes every writer."""

    def for_share(self, query):
        return query

    def for_update(self, query):
        return query

    def for_change(self, query):
        return query

    def among(self, field, values):
        """`field IN values` as one bound parameter: a JSON array unpacked by json_each. The
        query builder would otherwise write 10,000 placeholders one by one (measured: 2 of the
        3 s of a creation cycle)."""
        return field.in_(SQL("(SELECT value FROM json_each(?))", [json.dumps(list(values))]))

    def looked_up(self, field, values):
        """`field` among `values`, found by one probe of the index of `field` per value (what
        SQLite does for `among` already)."""
        return self.among(field, values)

    def ids_in_json(self, column, where):
        """A subquery of the ids held in the JSON arrays of `column` (riding_rows.row_ids)."""
        return "(SELECT j.value FROM riding_rows r, json_each(r.%s) j WHERE %s)" % (column, where)

    def json_id_array(self, column):
        """An aggregate making a JSON array of `column`, in order."""
        return "json_group_array(%s)" % column

    def add_to_counter(self, db, table, count):
        """Add `count` to the one-row counter `table` and return its new value."""
        db.execute_sql("UPDATE %s SET last = last + ?" % table, (count,))
        return db.execute_sql("SELECT last FROM %s" % table).fetchone()[0]

    def step_of(self, column, origin, step):
        """The step of `step` seconds that the time in `column` falls in, counted from the Unix
        time `origin`, in SQL (integer division)."""
        return (fn.strftime("%s", column).cast("INTEGER") - origin) / step

    def insert_rows(self, db, table, columns, rows, tail=""):
        """Insert rows (tuples) in multi-row INSERTs, each under SQLite's bound-parameter limit;
        `tail`: an ON CONFLICT clause."""
        head = "INSERT INTO %s (%s) VALUES " % (quote(table), ", ".join(quote(c) for c in columns))
        row_marks = "(%s)" % ", ".join(["?"] * len(columns))
        per_statement = max(1, MAX_PARAMS // len(columns))
        for start in range(0, len(rows), per_statement):
            part = rows[start:start + per_statement]
            db.execute_sql(head + ", ".join([row_marks] * len(part)) + tail,
                           [value for row in part for value in row])

    def encode_rows(self, rows):
        """Rows in the form `insert_encoded` writes them: as they are."""
        return rows

    def insert_encoded(self, db, table, columns, prefixed, encoded, tail_values, tail=""):
        """Insert rows made of a key, an encoded row (`encode_rows`) and `tail_values`, for each
        `(key, index)` of `prefixed`."""
        tail_values = tuple(map(sqlite_time, tail_values))
        self.insert_rows(db, table, columns, [(key,) + encoded[index] + tail_values for key, index in prefixed],
                         tail)

    def create_addresses(self, db, addresses, now):
        """Create the `emails_global` rows of `addresses` that do not exist yet. Returns {address:
        id} of those it knows without a lookup (none here: the caller looks them all up)."""
        now = sqlite_time(now)
        self.insert_rows(db, "emails_global", ("email", "created_at"), [(a, now) for a in addresses],
                         " ON CONFLICT DO NOTHING")
        return {}

    def update_new_rows(self, db, batch_id, rows, column, assignments, params, joining=None):
        """One UPDATE of the rows `(id, position, value)` of a batch that are still new: `column`
        takes the value, `assignments` (SQL with placeholders for `params`) the rest. With
        `joining` (see `LineJoin`), the rows it changed join the line. Returns how many changed."""
        sql = ("UPDATE user_batch_emails SET %s, %s = v.%s FROM (SELECT value ->> 0 AS id, value ->> 1 AS %s"
               " FROM json_each(?)) AS v WHERE user_batch_emails.id = v.id AND user_batch_emails.status = 'new'"
               % (assignments, column, column, column))
        values = json.dumps([(row_id, value) for row_id, _, value in rows])
        if joining is None:
            return db.execute_sql(sql, list(params) + [values]).rowcount
        # The ids it changed, then their line rows copied by one INSERT ... SELECT: the line costs
        # 0.8 us a row this way, 4.4 us when every column came back to be bound again.
        admitted = [r for (r,) in db.execute_sql(sql + " RETURNING user_batch_emails.id",
                                                 list(params) + [values]).fetchall()]
        turn, turn_params = joining.turns("?")
        db.execute_sql("INSERT INTO queued_emails (%s, user_id, turn) SELECT %s, ?, %s FROM user_batch_emails"
                       " WHERE id IN (SELECT value FROM json_each(?))"
                       % (", ".join(joining.target), ", ".join(joining.source), turn),
                       [joining.user_id, *turn_params, json.dumps(admitted)])
        return len(admitted)

    def let_go_after_fork(self, db):
        """Nothing to do: SQLite's locks belong to the process that took them."""

    def scrub_erased_pages(self, db):
        """Deleted rows are zeroed in the database file (`secure_delete`), but the write-ahead
        log keeps older copies of the pages they were on until it is written back and emptied:
        a checkpoint that truncates it (it waits for readers, up to the busy timeout). Returns
        None, or why the log could not be emptied."""
        busy, _, _ = db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            return ("the write-ahead log could not be emptied while other connections read; "
                    "it is overwritten as the service writes, or run the command again")
        return None

    def empty_tables(self, db, tables):
        for table in tables:
            db.execute_sql("DELETE FROM %s" % quote(table))


class Postgres:
    name = "postgres"
    def write_transaction(self, db):
        return db.atomic()

    def serialize_on(self, db, name, shared=False):
        """Inside a write transaction: wait for every other transaction serialized on `name`
        (a transaction-scoped advisory lock); `shared` ones only wait for, and hold off, those
        that are not."""
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        db.execute_sql("SELECT pg_advisory_xact_lock%s(%%s)" % ("_shared" if shared else ""), (key,))

    def for_share(self, query):
        """Lock the rows `query` selects against concurrent updates until the transaction ends."""
        return query.for_update("FOR SHARE")

    def for_update(self, query):
        return query.for_update()

    def for_change(self, query):
        """The lock an UPDATE of columns no foreign key refers to takes: a row referring to
        these may still be written meanwhile."""
        return query.for_update("FOR NO KEY UPDATE")

    def among(self, field, values):
        """`field = ANY(array)`, the array one literal parameter (see `array`). As a filter (rows
        found by another condition, this one checked on each) a literal array is searched by
        hashing; to find rows by an index of `field`, see `looked_up`."""
        return field == fn.ANY(SQL(*array(list(values))))

    def looked_up(self, field, values):
        """`field` among `values`, found by one probe of the index of `field` per value: `=
        ANY` of an array the planner does not see. Of a literal array it estimates each element
        against the column's statistics, which for 10,000 values took longer than the lookup
        itself (measured: 3-15 ms of planning against 9 ms of execution); joined to the unnested
        array, it chose by row counts to read the whole table (26 ms)."""
        marks, params = array(list(values))
        return field == fn.ANY(SQL("ARRAY(SELECT unnest(%s))" % marks, params))

    def ids_in_json(self, column, where):
        return "(SELECT json_array_elements_text(r.%s::json)::int FROM riding_rows r WHERE %s)" % (column, where)

    def json_id_array(self, column):
        return "json_agg(%s ORDER BY %s)::text" % (column, column)

    def add_to_counter(self, db, table, count):
        return db.execute_sql("UPDATE %s SET last = last + %%s RETURNING last" % table, (count,)).fetchone()[0]

    def step_of(self, column, origin, step):
        return fn.floor((fn.date_part("epoch", column) - origin) / step)

    def insert_rows(self, db, table, columns, rows, tail=""):
        """COPY the rows in: straight into `table`, or through a scratch table when conflicts must
        be handled (`tail`). psycopg2 quotes every parameter into the SQL text on the client,
        which costs more than the server's work; COPY sends plain text (measured: 150k results
        in 1.2 s by COPY, 5.5 s by multi-row INSERT)."""
        copy_in(db, table, columns, copy_text(rows), tail)

    def encode_rows(self, rows):
        """Rows as lines of COPY's text format: made where a download is read (its own process),
        so the cycle only joins them (measured on 150k verdicts: 0.8 s of the reading)."""
        return copy_lines(rows)

    def insert_encoded(self, db, table, columns, prefixed, encoded, tail_values, tail=""):
        after = copy_lines([tail_values])[0]
        lines = ["%d\t%s\t%s" % (key, encoded[index], after) for key, index in prefixed]
        if lines:
            copy_in(db, table, columns, "\n".join(lines) + "\n", tail)

    def create_addresses(self, db, addresses, now):
        """One statement creates the new rows and names them; only the addresses known before are
        looked up by the caller (an address another admitter created meanwhile among them)."""
        marks, params = array(addresses)
        return {email: gid for gid, email in db.execute_sql(
            "INSERT INTO emails_global (email, created_at) SELECT unnest(%s), %%s ON CONFLICT DO NOTHING"
            " RETURNING id, email" % marks, params + [now]).fetchall()}

    def update_new_rows(self, db, batch_id, rows, column, assignments, params, joining=None):
        """The rows are found by one range of the batch's positions in the index of rows not yet
        admitted, and each takes its value by its position, found by a binary search of the
        positions given (`width_bucket`). Joined to the values by id instead, the plan rested on
        the table's statistics: taken when no row was new, they made the planner loop over every
        value for every row (measured: 4.3 s for 5,000 rows, where this takes tens of
        milliseconds whatever the statistics say)."""
        rows = sorted(rows, key=lambda row: row[1])
        positions, position_params = array([position for _, position, _ in rows])
        values, value_params = array([value for _, _, value in rows])
        index = "width_bucket(e.position, a.positions)"   # of the row's position among those given
        sql = ("UPDATE user_batch_emails AS e SET %s, %s = a.given[%s]"
               " FROM (SELECT %s AS positions, %s AS given) AS a"
               " WHERE e.batch_id = %%s AND e.position BETWEEN %%s AND %%s"
               " AND e.check_type IS NULL AND e.status = 'new' AND a.positions[%s] = e.position"
               % (assignments, column, index, positions, values, index))
        sql_params = list(params) + position_params + value_params + [batch_id, rows[0][1], rows[-1][1]]
        if joining is not None:
            turn, turn_params = joining.turns("CAST(%s AS DOUBLE PRECISION)")
            sql = ("WITH admitted AS (%s RETURNING %s) INSERT INTO queued_emails (%s, user_id, turn)"
                   " SELECT *, %%s, %s FROM admitted"
                   % (sql, ", ".join("e." + c for c in joining.source), ", ".join(joining.target), turn))
            sql_params += [joining.user_id, *turn_params]
        return db.execute_sql(sql, sql_params).rowcount

    def let_go_after_fork(self, db):
        """In a forked process that never queries: close its copy of the parent's socket,
        without a word to the server (the parent's own stays open). The server then sees the
        parent end when it ends, and rolls back what it left open, rather than when this process
        does."""
        if not db.is_closed():
            os.close(db.connection().fileno())

    def scrub_erased_pages(self, db):
        """Nothing a connection can do: a deleted row stays in its page until a vacuum reuses the
        space, and in the write-ahead log and its archives (docs/operating.md)."""
        return None

    def empty_tables(self, db, tables):
        """DELETE, not TRUNCATE: the tables of a test hold a few rows, and a TRUNCATE makes every
        table anew (measured: 80-190 ms against 20 ms for the lot); every sequence starts again."""
        db.execute_sql("".join("DELETE FROM %s; " % quote(t) for t in tables)
                       + "SELECT setval(c.oid, 1, false) FROM pg_class c WHERE c.relkind = 'S'")


@dataclass(frozen=True)
class LineJoin:
    """Rows joining the line as an UPDATE admits them: the line's columns `target`, copied from
    the rows' `source`; their user; the first one's turn, and `step` more for each next one in
    position order (0: all the same, no window to compute)."""
    target: tuple
    source: tuple
    user_id: str
    first: float = 0.0
    step: float = 0.0

    def turns(self, number):
        """(SQL of each row's turn, its parameters), with `number` the placeholder of a float."""
        if not self.step:
            return number, [float(self.first)]
        return ("%s + (ROW_NUMBER() OVER (ORDER BY position) - 1) * %s" % (number, number),
                [float(self.first), float(self.step)])


def array(values):
    """An array parameter as one literal ('{1,2,3}'::bigint[]): the server reads it in one pass,
    where the driver's ARRAY[1, 2, 3] is an expression of 10,000 terms for the planner (measured:
    22 ms against 2 ms for 10,000 ids, 45 of them in a creation cycle). Returns (SQL, params)."""
    if set(map(type, values)) <= {int}:
        # integer[] where it can be: against an integer column, a bigint[] would be searched
        # element by element, not hashed, in a sequential scan.
        kind = "integer[]" if not values or -INT4 <= min(values) and max(values) < INT4 else "bigint[]"
        return "%s::" + kind, ["{%s}" % ",".join(map(str, values))]
    quoted = ('"%s"' % str(value).replace("\\", "\\\\").replace('"', '\\"') for value in values)
    return "%s::text[]", ["{%s}" % ",".join(quoted)]


# -- COPY's text format (PostgreSQL) --

# psycopg2 reads the COPY text a chunk at a time and takes Python's lock back for each one; with
# its 8 KB default a 60 MB ingest waited for the lock thousands of times while the download
# thread parsed (measured: 150k verdicts upserted in 3.9 s beside the thread, 1.4 s alone).
COPY_CHUNK = 1 << 20
COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
NULL = "\\N"


def copy_in(db, table, columns, text, tail=""):
    """COPY `text` into `table` (straight, or through a scratch table when `tail`, an ON
    CONFLICT clause, must be applied)."""
    # Inside a transaction already, no savepoint of its own: a failed COPY fails that
    # transaction anyway, and a savepoint costs two round trips more per COPY.
    with contextlib.nullcontext() if db.in_transaction() else db.atomic():
        copy_through(db.cursor(), table, ", ".join(quote(c) for c in columns), text, tail)


def copy_through(cursor, table, column_list, text, tail):
    target = table
    if tail:
        target = "bulk_" + table
        cursor.execute("DROP TABLE IF EXISTS pg_temp.%s" % quote(target))
        cursor.execute("CREATE TEMP TABLE %s ON COMMIT DROP AS SELECT %s FROM %s WITH NO DATA"
                       % (quote(target), column_list, quote(table)))
    cursor.copy_expert("COPY %s (%s) FROM STDIN" % (quote(target), column_list), io.StringIO(text),
                       size=COPY_CHUNK)
    if tail:
        cursor.execute("INSERT INTO %s (%s) SELECT %s FROM %s%s" % (
            quote(table), column_list, column_list, quote(target), tail))


def copy_text(rows):
    """The rows in COPY's text format."""
    lines = copy_lines(rows)
    return "\n".join(lines) + "\n" if lines else ""


def copy_lines(rows):
    """Each row as one line of COPY's text format, without its newline, built a column at a
    time: a column of text needing no escape (checked once over the whole column) is taken as it
    is, so the cost per value is a join, not a function call (measured: 150k result rows in
    0.3 s instead of 1.1 s)."""
    columns = [copy_column(values) for values in zip(*rows)]
    return list(map("\t".join, zip(*columns)))


def copy_column(values):
    kinds = set(map(type, values))
    if len(kinds) == 1 and values.count(values[0]) == len(values):   # one value for every row
        return [copy_value(values[0])] * len(values)
    kinds.discard(type(None))
    if kinds <= {str}:
        text = [v for v in values if v is not None]
        joined = "".join(text)
        if any(c in joined for c in "\\\t\n\r"):     # str's own search: faster than a regex
            return [NULL if v is None else v.translate(COPY_ESCAPES) for v in values]
        return [NULL if v is None else v for v in values] if len(text) < len(values) else values
    if kinds <= {int}:
        return [NULL if v is None else str(v) for v in values]
    if len(kinds) == 1:     # e.g. the one time of a whole batch: each distinct value formatted once
        formatted = {v: copy_value(v) for v in set(values)}
        return [formatted[v] for v in values]
    return [copy_value(v) for v in values]


def copy_value(value):
    """One value in COPY's text format."""
    if value is None:
        return NULL
    if value is True or value is False:
        return "t" if value else "f"
    if isinstance(value, str):
        return value.translate(COPY_ESCAPES)
    if isinstance(value, datetime.datetime):
        return value.isoformat(" ")
    return str(value)


SQLITE, POSTGRES = Sqlite(), Postgres()
