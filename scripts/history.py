"""A long history: a database as months of use leave it, filled in bulk, and the three steps
(submit, a creation cycle, a status cycle) measured on it against the same steps on an empty
database, in turn, in one run.

The fill, in plain SQL on a database `init-db` made (INSERT ... SELECT over generate_series on
PostgreSQL, over a table of numbers on SQLite, indexes dropped during it and made again after,
exactly as they were):
- `rows` ended rows in user batches of 100 to 100,000 rows (mostly small, a few large), of 2,000
  users, both check types: rows `done` (with their verdict's address and Bouncer batch),
  `invalid` (with the reason, no address), `failed` (missing from a download, or in a batch whose
  Bouncer batch failed) and `cancelled` (the second half of a cancelled batch); each written as
  a host writes it, then admitted, then ended, as the service's cycles rewrite it, so that the
  rows lie on their pages as the service leaves them (`write_rows`);
- `verdicts` addresses in `emails_global`, each with a verdict as the service writes it (the
  whole record in `raw`): four fifths in the deliverable results, one fifth in the catch-all
  results, checked over the last six months; each address held by two rows on average;
- `ledger` ended Bouncer batches (one in twenty failed), the last twenty within the last day;
- what else months of use leave: a webhook delivery and its attempt for every ended batch, a
  day of request history (40,000 requests, none in the last 5 minutes), the users' shares of the
  last day's Bouncer batches, Idempotency-Keys of the last day, 5,000 audit entries, the job
  runs, weights of a few users; the place-in-line counter past every batch.
Addresses end in `h@`, so none is an address the steps submit: the steps find no verdict to
reuse, on either side, and run the very same work.

Then PostgreSQL gets VACUUM (FREEZE, ANALYZE), as months of autovacuum leave a database; SQLite
is left as the service leaves it (no statistics: the service never runs ANALYZE there). The
filled database is kept as a snapshot that each repetition restores.
"""
import datetime
import json
import time
from dataclasses import dataclass

from scripts import workloads
from scripts.endtoend import SUBMIT_LINES, in_turn, progress

STEP_FILES = 40               # the steps are the targets' own: 200k lines as 40 files, then 15 x 10k
USERS = 2000
DAY = 86400
MONTHS = 180 * DAY            # the span of the history
REQUESTS = 40000              # a day of Bouncer requests, about one every two seconds
AUDIT_ENTRIES = 5000
IDEMPOTENCY_KEYS = 5000
ROWS_AT_ONCE = 200000        # the rows written, admitted and ended between two vacuums
RECENT_LEDGER = 20            # Bouncer batches of the last day, with their users' shares


@dataclass
class Size:
    """How much history: ended rows, verdicts (and addresses), ended Bouncer batches."""
    rows: int = 10000000
    verdicts: int = 5000000
    ledger: int = 1000

    def describe(self):
        return "%s ended rows, %s verdicts, %s ended Bouncer batches" % (
            format(self.rows, ","), format(self.verdicts, ","), format(self.ledger, ","))


QUICK = Size(rows=1000000, verdicts=500000, ledger=100)


# -- the fill ---------------------------------------------------------------------------------

def batch_size(b):
    """Rows of history batch `b`: mostly 100, one in ten 1,000, one in a hundred 10,000, one in a
    thousand 100,000 (about 370 rows a batch)."""
    if b % 1000 == 0:
        return 100000
    if b % 100 == 0:
        return 10000
    if b % 10 == 0:
        return 1000
    return 100


def batch_sizes(rows):
    """The sizes of the history's batches, adding up to `rows`."""
    sizes, total = [], 0
    while total < rows:
        size = min(batch_size(len(sizes) + 1), rows - total)
        sizes.append(size)
        total += size
    return sizes


def stamp(moment):
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


class Fill:
    """The SQL of the fill for one database: what differs between the two is said here."""

    def __init__(self, url, size, now):
        self.url, self.size, self.now = url, size, now
        self.pg = workloads.is_postgres_url(url)
        self.mark = "%s" if self.pg else "?"
        self.deliverable = size.verdicts * 4 // 5       # addresses 1..deliverable: deliverable verdicts
        self.catchall = size.verdicts - self.deliverable

    def ago(self, seconds):
        """SQL: the time `seconds` (an SQL expression) before now."""
        if self.pg:
            return "(TIMESTAMP '%s' - (%s) * INTERVAL '1 second')" % (stamp(self.now), seconds)
        return "strftime('%%Y-%%m-%%d %%H:%%M:%%f', '%s', '-' || (%s) || ' seconds')" % (stamp(self.now), seconds)

    def numbers(self, total):
        """SQL: a row source of the integers 1..total, as column `i`."""
        if self.pg:
            return "generate_series(1, %d) AS n(i)" % total
        return ("(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %d) SELECT i FROM n) AS n"
                % total)

    def positions(self):
        """SQL: each history batch `b` joined with its positions 1..total as `p`."""
        if self.pg:
            return "user_batches b CROSS JOIN LATERAL generate_series(1, b.total) AS n(p)"
        return "user_batches b CROSS JOIN bench_positions n ON n.p <= b.total"


def address(number):
    """SQL: the stripped address of history address `number` (an SQL expression): the same
    names and domains the steps submit, each ending in `h@`, so none is one of theirs."""
    return ("(CASE WHEN ({n}) % 10 = 0 THEN 'firstlast' || ({n}) || 'h@gmail.com'"
            " ELSE (CASE ({n}) % 4 WHEN 0 THEN 'user' WHEN 1 THEN 'q' WHEN 2 THEN 'anna.' ELSE 'info' END)"
            " || ({n}) || 'h@example-' || (({n}) % 50) || '.com' END)").format(n=number)


VERDICT = "(CASE id % 8 WHEN 0 THEN 'risky' WHEN 1 THEN 'undeliverable' WHEN 2 THEN 'unknown' ELSE 'deliverable' END)"
RECORD = ("'{\"email\":\"' || g.email || '\",\"status\":\"' || g.verdict || '\",\"reason\":\"accepted_email\","
          "\"domain\":{\"name\":\"' || (CASE WHEN g.id % 10 = 0 THEN 'gmail.com'"
          " ELSE 'example-' || (g.id % 50) || '.com' END)"
          " || '\",\"acceptAll\":\"no\","
          "\"disposable\":\"no\",\"free\":\"no\"},\"account\":{\"role\":\"no\",\"disabled\":\"no\","
          "\"fullMailbox\":\"no\"},\"dns\":{\"type\":\"MX\",\"record\":\"mx.example.com.\"},"
          "\"provider\":\"example.com\",\"score\":90,\"toxic\":\"unknown\",\"toxicity\":0,"
          "\"didYouMean\":null,\"retryAfter\":null}'")
INVALID_REASON = "The email address is not valid. It must have exactly one @-sign."
MISSING_REASON = "missing from the download of its Bouncer batch"
FAILED_REASON = "Bouncer batch failed: 404 Not Found"
# The position of a row decides what became of it, in its batch's fate.
ROW_STATUS = ("(CASE WHEN {p} % 50 = 0 THEN 'invalid'"
              " WHEN b.status = 'failed' THEN 'failed'"
              " WHEN b.status = 'cancelled' AND {p} * 2 > b.total THEN 'cancelled'"
              " WHEN {p} % 200 = 7 THEN 'failed' ELSE 'done' END)")
WITH_TIMES = ("user_batches", "bouncer_batches", "emails_global", "email_deliverable_results",
              "email_catchall_results", "user_batch_emails", "webhook_deliveries", "webhook_attempts",
              "rate_limit_tracker", "sent_shares", "api_idempotency_keys", "audit_log")
BULK_TABLES = ("user_batch_emails", "emails_global", "email_deliverable_results", "email_catchall_results")


def fill(url, size, now=None):
    """Fill the database at `url` (made by `init-db`, empty) with `size` of history; returns the
    seconds it took (the fill, then VACUUM and ANALYZE on PostgreSQL)."""
    started = time.perf_counter()
    sql = Fill(url, size, now or datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))
    connection = workloads.connect(url)
    try:
        cursor = connection.cursor()
        prepare(sql, cursor)
        connection.commit()
        with indexes_made_after(sql, cursor, BULK_TABLES):
            write_history(sql, cursor)
        connection.commit()
        finish(sql, connection, cursor)
    finally:
        connection.close()
    return time.perf_counter() - started


def prepare(sql, cursor):
    """Bulk-load settings of this connection only (the service's own settings are untouched)."""
    if sql.pg:
        cursor.execute("SET maintenance_work_mem = '512MB'")
        # The batch of every row exists by construction: no per-row check of the reference.
        cursor.execute("SET session_replication_role = replica")
        return
    for pragma in ("journal_mode = OFF", "synchronous = OFF", "cache_size = -1000000", "foreign_keys = OFF"):
        cursor.execute("PRAGMA " + pragma)


class indexes_made_after:
    """The tables' own indexes (and SQLite triggers) dropped while the block writes and made
    again after it from their own definitions, as a bulk load does: the same indexes, built once."""

    def __init__(self, sql, cursor, tables):
        self.sql, self.cursor = sql, cursor
        self.definitions = [d for table in tables for d in definitions(sql, cursor, table)]

    def __enter__(self):
        for name, kind, _ in self.definitions:
            self.cursor.execute("DROP %s %s" % (kind, name))

    def __exit__(self, *exc_info):
        if exc_info[0] is None:
            for _, _, definition in self.definitions:
                self.cursor.execute(definition)
        return False


def definitions(sql, cursor, table):
    """[(name, INDEX or TRIGGER, its CREATE statement)] of `table`, those a constraint owns left out."""
    if sql.pg:
        cursor.execute("SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i"
                       " WHERE i.indrelid = %s::regclass AND NOT EXISTS"
                       " (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)", (table,))
        return [(name, "INDEX", definition) for name, definition in cursor.fetchall()]
    cursor.execute("SELECT name, type, sql FROM sqlite_master WHERE tbl_name = ? AND type IN ('index', 'trigger')"
                   " AND sql IS NOT NULL", (table,))
    return [(name, kind.upper(), definition) for name, kind, definition in cursor.fetchall()]


def write_history(sql, cursor):
    sizes = batch_sizes(sql.size.rows)
    write_ledger(sql, cursor)
    write_user_batches(sql, cursor, sizes)
    write_addresses(sql, cursor)
    write_verdicts(sql, cursor)
    write_rows(sql, cursor, sizes)
    write_deliveries(sql, cursor)
    write_recent_activity(sql, cursor, len(sizes))


def write_ledger(sql, cursor):
    """The ended Bouncer batches over six months, the last RECENT_LEDGER within the last day;
    one in five of the catch-all check type (those numbered by five), one in twenty failed."""
    count, rows = sql.size.ledger, []
    for n in range(1, count + 1):
        left = count - n
        age = left * 3600 if left < RECENT_LEDGER else RECENT_LEDGER * 3600 + left * MONTHS // count
        reserved = sql.now - datetime.timedelta(seconds=age)
        finished = reserved + datetime.timedelta(minutes=12)
        failed = n % 20 == 11
        rows.append((n, "catchall" if n % 5 == 0 else "deliverable", "failed" if failed else "completed",
                     "history-%d" % n, 10000, stamp(reserved), stamp(reserved), stamp(finished),
                     "failed" if failed else "completed", stamp(finished), FAILED_REASON if failed else None,
                     None if failed else stamp(finished), None if failed else 10000, 0))
    insert_many(sql, cursor, "bouncer_batches (id, check_type, status, bouncer_id, quantity, reserved_at,"
                " sent_at, last_checked_at, bouncer_status, finished_at, failure_reason, bouncer_completed_at,"
                " credits, rechecks)", rows)


def write_user_batches(sql, cursor, sizes):
    """The ended user batches, oldest first, over six months: one in fifty failed (its Bouncer
    batch failed), one in forty cancelled halfway, the rest completed; one in five catch-all."""
    rows = []
    for b, size in enumerate(sizes, start=1):
        created = sql.now - datetime.timedelta(seconds=DAY + (len(sizes) - b) * MONTHS // len(sizes))
        ended = stamp(created + datetime.timedelta(minutes=30))
        status = "failed" if b % 50 == 7 else "cancelled" if b % 40 == 3 else "completed"
        rows.append((b, "customer%d" % (b % USERS), "catchall" if b % 5 == 4 else "deliverable", status, size,
                     size // 50, 0, stamp(created), b, ended, FAILED_REASON if status == "failed" else None,
                     ended if status == "cancelled" else None, ("cli", "api", "library", None)[b % 4],
                     "digest-%d" % (b % 5) if b % 4 == 1 else None))
    insert_many(sql, cursor, "user_batches (id, user_id, check_type, status, total, invalid, duplicates, created_at,"
                " fifo_order, completed_at, failure_reason, cancelled_at, source, api_token_digest)", rows)
    cursor.execute("UPDATE fifo_counter SET last = %d" % len(sizes))


def insert_many(sql, cursor, table_and_columns, rows):
    """Rows written by a few multi-row statements on PostgreSQL, one prepared statement on SQLite."""
    if sql.pg:
        from psycopg2.extras import execute_values
        execute_values(cursor, "INSERT INTO %s VALUES %%s" % table_and_columns, rows, page_size=5000)
    else:
        cursor.executemany("INSERT INTO %s VALUES (%s)" % (table_and_columns, ", ".join("?" * len(rows[0]))), rows)


def write_addresses(sql, cursor):
    cursor.execute("INSERT INTO emails_global (id, email, created_at) SELECT i, %s, %s FROM %s" % (
        address("i"), sql.ago("%d + (%d - i) * %.6f" % (DAY, sql.size.verdicts, MONTHS / sql.size.verdicts)),
        sql.numbers(sql.size.verdicts)))


def write_verdicts(sql, cursor):
    """A verdict for every address, as the service writes one (the whole record in `raw`)."""
    for table, low, high in (("email_deliverable_results", 1, sql.deliverable),
                             ("email_catchall_results", sql.deliverable + 1, sql.size.verdicts)):
        cursor.execute(
            "INSERT INTO %s (email_global_id, status, reason, score, accept_all, disposable, free, role, disabled,"
            " full_mailbox, provider, raw, checked_at, bouncer_batch_id)"
            " SELECT g.id, g.verdict, 'accepted_email', 90, 'no', 'no', 'no', 'no', 'no', 'no', 'example.com', %s,"
            " %s, g.id %% %d + 1 FROM (SELECT id, email, %s AS verdict FROM emails_global"
            " WHERE id BETWEEN %d AND %d) g" % (
                table, RECORD, sql.ago("%d + (%d - g.id) * %.6f" % (DAY, high, (MONTHS - DAY) / high)),
                sql.size.ledger, VERDICT, low, high))


def write_rows(sql, cursor, sizes):
    """Every history batch's rows, in batch and position order, as the service comes to hold
    them: written as a host writes them (batch, position, address), then admitted, then ended,
    by an UPDATE each (each committed, as each is a transaction of the service's), ROWS_AT_ONCE
    rows at a time, then vacuumed on PostgreSQL, as autovacuum does while the service runs.
    Written already ended, the rows would lie as the service never leaves them: each page
    filled with ended rows up to the fillfactor keeps room for one more row as a host writes
    it, and every row submitted after takes a page of its own (measured on a history of 1M
    rows: a file's 5,000 rows then lay on 4,582 pages, with half of each page kept free; on 179
    with the rows written, admitted and ended, as on 189 after 600,000 rows went through the
    service's own submit and cycles).
    Each row's address is picked among its check type's by a hash of (batch, position), its
    Bouncer batch among its check type's."""
    if not sql.pg:
        cursor.execute("CREATE TEMP TABLE bench_positions (p INTEGER PRIMARY KEY)")
        cursor.execute("INSERT INTO bench_positions SELECT i FROM %s" % sql.numbers(max(sizes)))
    written = row_values(sql, "n.p")
    ended = row_values(sql, "user_batch_emails.position")
    admitted = dict(ended, status="CASE WHEN %s = 'invalid' THEN 'invalid' ELSE 'queued' END" % ended["status"])
    first_batch = first_row = 1
    for last_batch, rows in parts_of(sizes, ROWS_AT_ONCE):
        cursor.execute("INSERT INTO user_batch_emails (batch_id, position, email) SELECT b.id, n.p, %s FROM %s"
                       " WHERE b.id BETWEEN %d AND %d ORDER BY b.id, n.p"
                       % (written["email"], sql.positions(), first_batch, last_batch))
        cursor.connection.commit()
        for row, columns in ((admitted, ADMITTED_COLUMNS), (ended, ENDED_COLUMNS)):
            # Committed: a row's earlier version can then be pruned from its page to make room
            # for the next, as between the service's transactions.
            cursor.execute("UPDATE user_batch_emails SET %s FROM user_batches b WHERE b.id = user_batch_emails.batch_id"
                           " AND user_batch_emails.id BETWEEN %d AND %d"
                           % (", ".join("%s = %s" % (column, row[column]) for column in columns),
                              first_row, first_row + rows - 1))
            cursor.connection.commit()
        if sql.pg:
            vacuum(cursor.connection, "user_batch_emails")
        first_batch, first_row = last_batch + 1, first_row + rows


def parts_of(sizes, rows):
    """[(last batch id, rows)] of consecutive batches (ids from 1) of about `rows` rows each."""
    parts, count = [], 0
    for b, size in enumerate(sizes, start=1):
        count += size
        if count >= rows or b == len(sizes):
            parts.append((b, count))
            count = 0
    return parts


def vacuum(connection, table):
    """`table` vacuumed (outside a transaction)."""
    connection.autocommit = True
    try:
        connection.cursor().execute("VACUUM %s" % table)
    finally:
        connection.autocommit = False


ADMITTED_COLUMNS = ("status", "email_global_id", "check_type", "fifo_order")
ENDED_COLUMNS = ("status", "bouncer_batch_id", "failure_reason", "completed_at")


def row_values(sql, position):
    """{column: SQL} of the values of a history row at `position` (an SQL expression) of user
    batch `b`: its address as written, and what its admission and its end wrote."""
    status = ROW_STATUS.format(p=position)
    x = "(CAST(b.id AS BIGINT) * 7919 + CAST(%s AS BIGINT) * 104729)" % position
    fifth = max(1, sql.size.ledger // 5)
    gid = ("(CASE WHEN b.check_type = 'catchall' THEN %d + %s %% %d ELSE %s %% %d END + 1)"
           % (sql.deliverable, x, max(1, sql.catchall), x, sql.deliverable))
    ledger = ("(CASE WHEN b.check_type = 'catchall' THEN (%s %% %d + 1) * 5 ELSE (%s %% %d) * 5 + 1 + %s %% 4 END)"
              % (x, fifth, x, fifth, x))
    return {"email": "CASE WHEN %s = 'invalid' THEN 'not an address ' || %s ELSE %s END"
                     % (status, position, address(gid)),
            "status": status,
            "email_global_id": "CASE WHEN %s = 'invalid' THEN NULL ELSE %s END" % (status, gid),
            "check_type": "b.check_type",
            "fifo_order": "b.fifo_order",
            "bouncer_batch_id": "CASE WHEN %s IN ('done', 'failed') THEN %s END" % (status, ledger),
            "failure_reason": "CASE %s WHEN 'invalid' THEN '%s' WHEN 'failed' THEN '%s' END"
                              % (status, INVALID_REASON, MISSING_REASON),
            "completed_at": "b.completed_at"}


def write_deliveries(sql, cursor):
    """A webhook delivery for every ended batch (one in a hundred given up after its retries),
    with its last attempt."""
    payload = ("'{\"type\":\"batch.' || b.status || '\",\"timestamp\":\"' || b.completed_at || '\",\"data\":"
               "{\"batch_id\":' || b.id || ',\"user_id\":\"' || b.user_id || '\",\"check_type\":\"' || b.check_type"
               " || '\",\"status\":\"' || b.status || '\",\"total\":' || b.total || ',\"done\":' || b.total"
               " || ',\"counts\":{\"deliverable\":0,\"risky\":0,\"undeliverable\":0,\"unknown\":0,\"invalid\":'"
               " || b.invalid || ',\"failed\":0,\"cancelled\":0,\"pending\":0},\"created_at\":\"' || b.created_at"
               " || '\",\"completed_at\":\"' || b.completed_at || '\",\"failure_reason\":null}}'")
    cursor.execute(
        "INSERT INTO webhook_deliveries (batch_id, event, message_id, payload, url, state, attempts, next_attempt_at,"
        " last_status, created_at, finished_at) SELECT b.id, 'batch.' || b.status, 'msg_history_' || b.id, %s,"
        " 'https://app.example.com/hooks/bouncer', CASE WHEN b.id %% 100 = 0 THEN 'given up' ELSE 'delivered' END,"
        " CASE WHEN b.id %% 100 = 0 THEN 7 ELSE 1 END, b.completed_at,"
        " CASE WHEN b.id %% 100 = 0 THEN 503 ELSE 200 END, b.completed_at, b.completed_at"
        " FROM user_batches b ORDER BY b.id" % payload)
    cursor.execute("INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, seconds)"
                   " SELECT id, finished_at, last_status, 0.12 FROM webhook_deliveries ORDER BY id")


def write_recent_activity(sql, cursor, batches):
    """The last day: Bouncer requests (none in the last 5 minutes, so the budget is whole), the
    users' shares of the recent Bouncer batches, Idempotency-Keys; audit entries over the months;
    the four jobs' last runs; a few users' weights."""
    cursor.execute(
        "INSERT INTO rate_limit_tracker (requested_at, kind, check_type) SELECT %s,"
        " CASE i %% 10 WHEN 0 THEN 'create' WHEN 1 THEN 'download' ELSE 'status' END,"
        " CASE WHEN i %% 5 = 4 THEN 'catchall' ELSE 'deliverable' END FROM %s ORDER BY i DESC"
        % (sql.ago("300 + i * 2"), sql.numbers(REQUESTS)))
    first = max(1, sql.size.ledger - RECENT_LEDGER + 1)
    cursor.execute(
        "INSERT INTO sent_shares (bouncer_batch_id, check_type, user_id, addresses, reserved_at)"
        " SELECT l.id, l.check_type, 'customer' || ((l.id * 10 + n.i) %% %d), 1000, l.reserved_at"
        " FROM bouncer_batches l CROSS JOIN %s WHERE l.id >= %d" % (USERS, sql.numbers(10), first))
    cursor.execute(
        "INSERT INTO api_idempotency_keys (token_digest, key, request_digest, batch_id, invalid_lines, created_at)"
        " SELECT 'digest-' || (i %% 5), 'key-' || i, 'request-' || i, i %% %d + 1, '[]', %s FROM %s"
        % (batches, sql.ago("600 + i * 16"), sql.numbers(IDEMPOTENCY_KEYS)))
    cursor.execute(
        "INSERT INTO audit_log (at, who, action, target, detail) SELECT %s, 'operator',"
        " CASE i %% 4 WHEN 0 THEN 'pause' WHEN 1 THEN 'resume' WHEN 2 THEN 'cancel' ELSE 'fail' END,"
        " 'user batch ' || i, NULL FROM %s"
        % (sql.ago("i * %d" % (MONTHS // AUDIT_ENTRIES)), sql.numbers(AUDIT_ENTRIES)))
    now = stamp(sql.now)
    cursor.executemany(
        "INSERT INTO job_runs (job_id, last_started_at, last_success_at, failures_in_a_row, refusals_in_a_row,"
        " last_summary, last_seconds) VALUES (%s, %s, %s, 0, 0, 'history', 0.5)" % ((sql.mark,) * 3),
        [("%s_%s" % (job, check), now, now) for job in ("batch_creator", "status_checker")
         for check in ("deliverable", "catchall")])
    cursor.executemany("INSERT INTO user_weights (user_id, weight) VALUES (%s, %s)" % (sql.mark, sql.mark),
                       [("customer%d" % u, 1.0 + u % 3) for u in range(0, USERS, 100)])


def finish(sql, connection, cursor):
    """PostgreSQL: the sequences past the ids written, then VACUUM (FREEZE, ANALYZE), as months
    of autovacuum leave a database. SQLite: the write-ahead log back on, as the service uses it."""
    if not sql.pg:
        cursor.execute("PRAGMA journal_mode = WAL")
        return
    cursor.execute("SELECT table_name, column_name FROM information_schema.columns"
                   " WHERE table_schema = 'public' AND column_default LIKE 'nextval%'")
    for table, column in cursor.fetchall():
        cursor.execute("SELECT setval(pg_get_serial_sequence(%s, %s), COALESCE(MAX({c}), 0) + 1, false)"
                       " FROM {t}".format(c=column, t=table), (table, column))
    connection.commit()
    connection.autocommit = True
    cursor.execute("VACUUM (FREEZE, ANALYZE)")


def counts(url):
    """{table: rows} of the tables the fill writes, to print beside the measures."""
    connection = workloads.connect(url)
    try:
        cursor = connection.cursor()
        found = {}
        for table in WITH_TIMES:
            cursor.execute("SELECT COUNT(*) FROM %s" % table)
            found[table] = cursor.fetchone()[0]
        return found
    finally:
        connection.close()


# -- the steps, empty against long history ----------------------------------------------------

def measure(bench, size):
    """On one database: the history filled and kept as a snapshot, then, repetition by
    repetition, the three steps from an empty database and from the history, in turn.
    Returns {"fill": {...}, "steps": {step: {"empty": {...}, "history": {...}}}}."""
    side = bench.ours
    files = workloads.write_files(bench.path("history-submit"), STEP_FILES, SUBMIT_LINES)
    side.fresh()
    seconds = fill(side.url, size)
    found = {"fill": {"size": size.__dict__, "seconds": seconds, "bytes": workloads.database_bytes(side.url),
                      "tables": counts(side.url)}}
    progress("%s: history filled in %.0f s (%.1f GB)" % (bench.backend, seconds, found["fill"]["bytes"] / 1e9))
    filled = bench.copy_of(side.url, "history")
    workloads.snapshot(side.url, filled)
    steps = found["steps"] = {step: {"empty": {"seconds": [], "rss_mb": []}, "history": {"seconds": [], "rss_mb": []}}
                              for step in ("submit", "creation", "status")}
    try:
        for rep in range(bench.plan.reps):
            for start in in_turn(("empty", "history"), rep):
                for step, (seconds, rss) in run_steps(bench, files, filled if start == "history" else None).items():
                    steps[step][start]["seconds"].append(seconds)
                    steps[step][start]["rss_mb"].append(rss)
            progress("%s: repetition %d of %d of the history's steps" % (bench.backend, rep + 1, bench.plan.reps))
    finally:
        workloads.drop_database(filled)   # gigabytes: not left for the end of the run
    return found


def run_steps(bench, files, filled):
    """The three steps, one after the other, from the history at `filled` (None: an empty
    database): {step: (seconds, peak RSS of its largest process)}."""
    side = bench.ours
    if filled:
        workloads.restore(filled, side.url)
        workloads.settle(side.url)
    else:
        side.fresh()
    found = {"submit": bench.submit_files(side, files, fresh=False)}
    workloads.analyze(side.url)   # what autovacuum gathers within a minute of the submit
    workloads.settle(side.url)
    sandbox = bench.sandbox()
    try:
        run = bench.creation_cycle(side, sandbox)
        found["creation"] = run.seconds, run.rss_mb
        run = bench.status_cycle(side, sandbox, rows=None)   # a file's repeats ride along
        found["status"] = run.seconds, run.rss_mb
    finally:
        sandbox.stop()
    return found


def print_table(backend, found, reps):
    """The steps on the history against an empty database, and what the history holds."""
    import statistics
    from scripts.endtoend import mb, spread
    fill_found = found["fill"]
    print("\n#### %s, a long history (%s; median of %d, min-max)\n" % (
        backend, Size(**fill_found["size"]).describe(), reps))
    print("| step | empty database | long history | history / empty | peak RSS: empty | peak RSS: history |")
    print("|---|---:|---:|---:|---:|---:|")
    for step, name in STEP_NAMES.items():
        empty, history = found["steps"][step]["empty"], found["steps"][step]["history"]
        print("| %s | %s | %s | %.2f | %s | %s |" % (
            name, spread(empty["seconds"]), spread(history["seconds"]),
            statistics.median(history["seconds"]) / statistics.median(empty["seconds"]),
            mb(empty["rss_mb"]), mb(history["rss_mb"])))
    print("\nFilled in %.0f s, %.1f GB: %s." % (fill_found["seconds"], fill_found["bytes"] / 1e9, json.dumps(
        fill_found["tables"]).strip("{}").replace('"', "")))


STEP_NAMES = {"submit": "submit 200k lines as 40 files of 5,000 (40 processes)",
              "creation": "one creation cycle filling 15 x 10k (1 process)",
              "status": "one status cycle, 150k results (1 process)"}
