"""What the benchmark feeds the service, and the floors it is compared with.

- address files like a user's: repeats, Gmail spellings, a few invalid lines;
- a queue's worth of distinct addresses;
- fresh databases (a SQLite file, a PostgreSQL schema) for each measure;
- rows written the way a host application writes them, with plain SQL in committed slices;
- the floor of a bulk write: one raw multi-row INSERT on SQLite, COPY on PostgreSQL, through
  the drivers themselves, so no layer of ours or Peewee's is in it.

Only the standard library and the database drivers: a child process that imports this stays
small.
"""
import contextlib
import datetime
import io
import os
import time
from urllib.parse import unquote, urlsplit

HOST_SLICE = 10000          # rows a host commits at once
SQLITE_ROWS_PER_INSERT = 2000


def submitted_line(i):
    """Line `i` of a user's file: mostly distinct addresses, every tenth a Gmail spelling (dots,
    a +tag; two lines in a row reach the same mailbox), one in a thousand invalid."""
    if i % 1000 == 999:
        return "not an address %d" % i
    if i % 10 == 0:
        return "First.Last%d+tag@gmail.com" % (i // 20)
    return "user%d@example-%d.com" % (i, i % 50)


def queued_address(i):
    """Address `i` of a queue: every one a mailbox of its own, so 15 batches hold 150,000."""
    if i % 10 == 0:
        return "First.Last%d@gmail.com" % i
    return "q%d@example-%d.com" % (i, i % 50)


def write_file(path, lines, start=0, line=submitted_line):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(start, start + lines):
            f.write(line(i) + "\n")
    return path


def write_files(directory, files, lines_per_file, line=submitted_line):
    """`files` files of `lines_per_file` lines each, numbered on from one to the next."""
    os.makedirs(directory, exist_ok=True)
    return [write_file(os.path.join(directory, "part-%03d.txt" % n), lines_per_file,
                       n * lines_per_file, line) for n in range(files)]


# -- databases --------------------------------------------------------------------------------

def is_postgres_url(url):
    return url.startswith("postgres")


def sqlite_path(url):
    return unquote(urlsplit(url).path[1:])


def connect(url):
    """A plain DB-API connection to `url`, as a host application would open one."""
    if is_postgres_url(url):
        import psycopg2
        parts = urlsplit(url)
        return psycopg2.connect(host=parts.hostname, port=parts.port or 5432,
                                user=parts.username or "postgres", password=parts.password,
                                dbname=parts.path.lstrip("/"), connect_timeout=10)
    import sqlite3
    return sqlite3.connect(sqlite_path(url), timeout=30)


def fresh_database(url):
    """Empty the database at `url`: a SQLite file removed, a PostgreSQL schema made anew."""
    if not is_postgres_url(url):
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sqlite_path(url) + suffix)
        return
    connection = connect(url)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("DROP SCHEMA IF EXISTS public CASCADE")
        cursor.execute("CREATE SCHEMA public")
    connection.close()


def analyze(url, vacuum=False):
    """PostgreSQL: the statistics autovacuum would have gathered within a minute of a large
    write, gathered now, so that no measure depends on whether it came by yet; with `vacuum`,
    what else it would have done by then too (the old versions of rewritten rows, and their
    index entries, gone). SQLite keeps none unless told to, and the service never tells it:
    nothing to do."""
    if is_postgres_url(url):
        connection = connect(url)
        connection.autocommit = True
        connection.cursor().execute("VACUUM ANALYZE" if vacuum else "ANALYZE")
        connection.close()


def settle(url, timeout=60):
    """PostgreSQL: the server quiet before a step is timed, so that no step pays for what an
    earlier one (the other side's, say) left behind: its dirty pages written out by a
    checkpoint, and no autovacuum worker running (waited for, up to `timeout` seconds).
    SQLite does nothing in the background: nothing to do."""
    if not is_postgres_url(url):
        return
    connection = connect(url)
    connection.autocommit = True
    try:
        cursor = connection.cursor()
        cursor.execute("CHECKPOINT")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")
            if cursor.fetchone()[0] == 0:
                return
            time.sleep(0.2)
    finally:
        connection.close()


def snapshot(url, copy_url):
    """Copy the database at `url` to `copy_url` (nothing may be connected to it)."""
    copy_database(url, copy_url)


def restore(copy_url, url):
    """Make the database at `url` what `copy_url` holds (nothing may be connected to either)."""
    copy_database(copy_url, url)


def copy_database(source, target):
    if not is_postgres_url(source):
        import shutil
        import sqlite3
        connection = sqlite3.connect(sqlite_path(source))
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
        fresh_database(target)
        shutil.copyfile(sqlite_path(source), sqlite_path(target))
        # On disk before any step is timed: the copy's gigabytes (the long history) otherwise
        # reach the disk during the next steps, whose first checkpoint waits for them (measured:
        # a creation cycle right after restoring the full history, 2.99 s against 1.83 s).
        # PostgreSQL's FILE_COPY makes its copy durable itself.
        with open(sqlite_path(target), "rb+") as copied:
            os.fsync(copied.fileno())
        return
    admin = connect(urlsplit(source)._replace(path="/postgres").geturl())
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % urlsplit(target).path.lstrip("/"))
        cursor.execute('CREATE DATABASE "%s" TEMPLATE "%s"%s' % (
            urlsplit(target).path.lstrip("/"), urlsplit(source).path.lstrip("/"), copy_strategy(cursor)))
    admin.close()


def copy_strategy(cursor):
    """PostgreSQL 15 copies a template block by block through the write-ahead log unless told
    to copy its files: for a database of gigabytes (the long history) minutes against seconds."""
    cursor.execute("SHOW server_version_num")
    return " STRATEGY = FILE_COPY" if int(cursor.fetchone()[0]) >= 150000 else ""


def database_bytes(url):
    """The size of the database at `url` on disk (a SQLite file with its write-ahead log)."""
    if not is_postgres_url(url):
        return sum(os.path.getsize(sqlite_path(url) + suffix) for suffix in ("", "-wal")
                   if os.path.exists(sqlite_path(url) + suffix))
    connection = connect(url)
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT pg_database_size(current_database())")
        return cursor.fetchone()[0]
    finally:
        connection.close()


def side_url(url, name):
    """The URL of a database of its own for `name`, beside the one at `url`: another SQLite
    file in the same directory, another database on the same PostgreSQL server (created when
    missing)."""
    if not is_postgres_url(url):
        stem = os.path.splitext(sqlite_path(url))[0]
        return "sqlite:///%s_%s.db" % (stem, name)
    parts = urlsplit(url)
    database = "%s_%s" % (parts.path.lstrip("/"), name)
    admin = connect(parts._replace(path="/postgres").geturl())
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if cursor.fetchone() is None:
            cursor.execute('CREATE DATABASE "%s"' % database)
    admin.close()
    return parts._replace(path="/" + database).geturl()


def drop_database(url):
    """Remove the database at `url`: its SQLite files, or the PostgreSQL database."""
    if not is_postgres_url(url):
        fresh_database(url)
        return
    parts = urlsplit(url)
    admin = connect(parts._replace(path="/postgres").geturl())
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % parts.path.lstrip("/"))
    admin.close()


# -- the SQL door -----------------------------------------------------------------------------

def host_write_batch(url, user_id, addresses, check_type="deliverable"):
    """One user batch written as the README tells a host to write a large one: `loading`, the
    rows in committed slices, then `new`. Returns the batch id."""
    connection = connect(url)
    mark = "%s" if is_postgres_url(url) else "?"
    try:
        cursor = connection.cursor()
        cursor.execute("INSERT INTO user_batches (user_id, check_type, status) VALUES (%s, %s, 'loading')"
                       " RETURNING id" % (mark, mark), (user_id, check_type))
        (batch_id,) = cursor.fetchone()
        connection.commit()
        rows = ((batch_id, position, email) for position, email in enumerate(addresses, start=1))
        while True:
            part = [row for _, row in zip(range(HOST_SLICE), rows)]
            if not part:
                break
            insert_host_rows(connection, cursor, part, mark)
            connection.commit()
        cursor.execute("UPDATE user_batches SET status = 'new' WHERE id = %s" % mark, (batch_id,))
        connection.commit()
        return batch_id
    finally:
        connection.close()


def insert_host_rows(connection, cursor, rows, mark):
    sql = "INSERT INTO user_batch_emails (batch_id, position, email) VALUES "
    if mark == "%s":
        from psycopg2.extras import execute_values
        execute_values(cursor, sql + "%s", rows, page_size=len(rows))
        return
    for start in range(0, len(rows), SQLITE_ROWS_PER_INSERT):
        part = rows[start:start + SQLITE_ROWS_PER_INSERT]
        cursor.execute(sql + ",".join(["(?, ?, ?)"] * len(part)), [v for row in part for v in row])


# -- floors -----------------------------------------------------------------------------------

SUBMIT_COLUMNS = (("batch_id", "INTEGER"), ("position", "INTEGER"), ("email", "TEXT"))
RESULT_COLUMNS = (("email_global_id", "INTEGER PRIMARY KEY"), ("status", "TEXT"), ("reason", "TEXT"),
                  ("score", "INTEGER"), ("accept_all", "TEXT"), ("disposable", "TEXT"),
                  ("free", "TEXT"), ("role", "TEXT"), ("disabled", "TEXT"),
                  ("full_mailbox", "TEXT"), ("provider", "TEXT"), ("raw", "TEXT"),
                  ("checked_at", "TIMESTAMP"))


def submitted_rows(lines):
    return [(1, i + 1, submitted_line(i)) for i in range(lines)]


def result_rows(count):
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    return [(i + 1, "deliverable", "accepted_email", 90, "no", "no", "no", "no", "no", "no",
             "example.com", '{"email": "q%d@example.com", "status": "deliverable"}' % i, now)
            for i in range(count)]


def raw_bulk_insert(url, columns, rows):
    """Seconds to write `rows` into a new table of `columns` in one transaction, by the fastest
    plain path: multi-row INSERTs on SQLite, COPY on PostgreSQL."""
    import time
    connection = connect(url)
    try:
        cursor = connection.cursor()
        cursor.execute("DROP TABLE IF EXISTS bench_floor")
        cursor.execute("CREATE TABLE bench_floor (%s)" % ", ".join("%s %s" % c for c in columns))
        connection.commit()
        started = time.perf_counter()
        write_rows(cursor, is_postgres_url(url), "bench_floor", tuple(name for name, _ in columns), rows)
        connection.commit()
        seconds = time.perf_counter() - started
        cursor.execute("DROP TABLE bench_floor")
        connection.commit()
        return seconds
    finally:
        connection.close()


# -- the queue's own writes, in plain SQL ----------------------------------------------------

def queue_write_floors(url, batches=15, batch=10000):
    """Seconds of the writes a claim and an ingest cannot do without in this schema, done in
    plain SQL on a database made by `init-db` (the same tables and indexes), a statement or two
    per batch of `batch` rows, each batch committed: (claim: rows out of the line, their in-flight
    addresses and the rows riding on them written; ingest: verdicts written, rows marked done,
    in-flight addresses and riding rows removed).
    What the cycles add to these is the service's own work: planning, checks, parsing, calls."""
    import time
    connection = connect(url)
    pg = is_postgres_url(url)
    mark = "%s" if pg else "?"
    total = batches * batch
    try:
        cursor = connection.cursor()
        seed_queued_rows(connection, cursor, total, batches, mark)
        claim = ingest = 0.0
        results = result_rows(total)
        for b in range(batches):
            low, high = b * batch + 1, (b + 1) * batch
            started = time.perf_counter()
            cursor.execute("DELETE FROM queued_emails WHERE row_id BETWEEN %s AND %s" % (mark, mark), (low, high))
            write_rows(cursor, pg, "bouncer_batch_emails", ("bouncer_batch_id", "email_global_id",
                                                            "check_type", "email_sent"),
                       [(b + 1, i, "deliverable", "q%d@example.com" % i) for i in range(low, high + 1)])
            cursor.execute("INSERT INTO riding_rows (bouncer_batch_id, batch_id, row_ids, rows)"
                           " VALUES (%s, %s, %s, %s)" % ((mark,) * 4),
                           (b + 1, b + 1, "[%s]" % ",".join(map(str, range(low, high + 1))), batch))
            connection.commit()
            claim += time.perf_counter() - started
        for b in range(batches):
            low, high = b * batch + 1, (b + 1) * batch
            started = time.perf_counter()
            write_rows(cursor, pg, "email_deliverable_results", RESULT_NAMES + ("bouncer_batch_id",),
                       [row + (b + 1,) for row in results[low - 1:high]])
            cursor.execute("UPDATE user_batch_emails SET status = 'done', completed_at = %s, bouncer_batch_id = %s"
                           " WHERE id IN (%s)" % (mark, mark, RIDING_IDS[pg])
                           + " AND status = 'queued'", (results[0][-1], b + 1, b + 1))
            cursor.execute("DELETE FROM bouncer_batch_emails WHERE bouncer_batch_id = %s" % mark, (b + 1,))
            cursor.execute("DELETE FROM riding_rows WHERE bouncer_batch_id = %s" % mark, (b + 1,))
            connection.commit()
            ingest += time.perf_counter() - started
        return claim, ingest
    finally:
        connection.close()


RESULT_NAMES = tuple(name for name, _ in RESULT_COLUMNS)
# The ids of the rows riding on one Bouncer batch (as bouncer/queue/line.py reads them).
RIDING_IDS = {True: "SELECT json_array_elements_text(row_ids::json)::int FROM riding_rows WHERE bouncer_batch_id = %s",
              False: "SELECT j.value FROM riding_rows, json_each(riding_rows.row_ids) j WHERE bouncer_batch_id = ?"}


def seed_queued_rows(connection, cursor, total, batches, mark):
    """`total` queued rows of distinct addresses in user batches of 10k, and `batches` ledger rows."""
    now = datetime.datetime(2026, 12, 1)
    per = total // batches
    cursor.execute("INSERT INTO emails_global (id, email, created_at) SELECT i, 'q' || i || '@example.com', %s"
                   " FROM (%s) AS s" % (mark, numbers(total, mark)), (now,))
    for b in range(batches):
        cursor.execute("INSERT INTO user_batches (id, user_id, check_type, status, fifo_order, total)"
                       " VALUES (%s, %s, 'deliverable', 'processing', %s, %s)" % ((mark,) * 4),
                       (b + 1, "user%d" % b, b + 1, per))
        cursor.execute("INSERT INTO bouncer_batches (id, check_type, status, quantity, reserved_at)"
                       " VALUES (%s, 'deliverable', 'reserved', %s, %s)" % ((mark,) * 3), (b + 1, per, now))
    cursor.execute("INSERT INTO user_batch_emails (id, batch_id, position, email, status, email_global_id,"
                   " check_type, fifo_order) SELECT i, (i - 1) / %d + 1, (i - 1) %% %d + 1,"
                   " 'q' || i || '@example.com', 'queued', i, 'deliverable', (i - 1) / %d + 1"
                   " FROM (%s) AS s" % (per, per, per, numbers(total, mark)))
    cursor.execute("INSERT INTO queued_emails (row_id, batch_id, check_type, fifo_order, position, email_global_id,"
                   " email) SELECT id, batch_id, check_type, fifo_order, position, email_global_id, email"
                   " FROM user_batch_emails")
    connection.commit()
    cursor.execute("ANALYZE")
    connection.commit()


def numbers(total, mark):
    """A subquery of the integers 1..total, as column i."""
    return "SELECT generate_series(1, %d) AS i" % total if mark == "%s" else (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %d) SELECT i FROM n" % total)


def write_rows(cursor, pg, table, names, rows):
    """The fastest plain path: COPY on PostgreSQL, multi-row INSERTs on SQLite."""
    if pg:
        text = "".join("\t".join("\\N" if v is None else str(v) for v in row) + "\n" for row in rows)
        cursor.copy_expert("COPY %s (%s) FROM STDIN" % (table, ", ".join(names)), io.StringIO(text))
        return
    marks = "(%s)" % ",".join("?" * len(names))
    per_insert = max(1, 30000 // len(names))
    for start in range(0, len(rows), per_insert):
        part = rows[start:start + per_insert]
        cursor.execute("INSERT INTO %s (%s) VALUES %s" % (table, ", ".join(names), ",".join([marks] * len(part))),
                       [v for row in part for v in row])


def copy_floor(url, path):
    """Seconds of a raw `\\copy` of the lines of the file at `path` into a new one-column table
    on the PostgreSQL server at `url`, by psql as a user runs it (its start and connection
    included): the least the server needs to take those lines."""
    import shutil
    import subprocess
    connection = connect(url)
    connection.autocommit = True
    try:
        connection.cursor().execute("DROP TABLE IF EXISTS bench_copy_floor")
        connection.cursor().execute("CREATE TABLE bench_copy_floor (line TEXT)")
        command = "\\copy bench_copy_floor (line) FROM '%s'" % path
        started = time.perf_counter()
        if shutil.which("psql"):
            subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", command, url], check=True,
                           stdout=subprocess.DEVNULL)
        else:   # the same COPY FROM STDIN, from this process
            with open(path) as lines:
                connection.cursor().copy_expert("COPY bench_copy_floor (line) FROM STDIN", lines)
        seconds = time.perf_counter() - started
        connection.cursor().execute("DROP TABLE bench_copy_floor")
        return seconds
    finally:
        connection.close()
