"""The database: opened once from DATABASE_URL, plus the few helpers every data module shares."""
import contextlib
import datetime
import hashlib
from itertools import islice

from peewee import PostgresqlDatabase, SqliteDatabase
from playhouse.db_url import connect

from .config import redact_url
from .models import ALL_MODELS, database

# IN lists of up to CHUNK ids; multi-row INSERTs of up to MAX_PARAMS values. Both stay under
# SQLite's 32,766 bound parameters and Postgres's 65,535.
CHUNK = 10000
MAX_PARAMS = 30000

SQLITE_PRAGMAS = {
    "journal_mode": "wal",        # readers never block the one writer
    "synchronous": "normal",
    "foreign_keys": 1,
    "cache_size": -16 * 1024,     # 16 MiB
}


class DatabaseUnavailable(Exception):
    """The database cannot be opened or used; the message names it without secrets."""


def utcnow():
    """Naive UTC: every stored time is UTC, on SQLite and Postgres alike."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def open_database(url):
    """Bind the models to the database at `url` and return it."""
    options = {}
    if url.startswith("sqlite"):
        # A writer waits this long for another process's transaction before giving up.
        options = {"pragmas": SQLITE_PRAGMAS, "timeout": 30}
    try:
        db = connect(url, **options)
    except Exception as exc:
        raise DatabaseUnavailable("cannot open database %s: %s" % (redact_url(url), exc)) from None
    database.initialize(db)
    return db


def create_schema():
    """Create the tables and indexes that are missing; safe to run again and again."""
    with database.connection_context():
        database.create_tables(ALL_MODELS, safe=True)


def is_postgres():
    return isinstance(database.obj, PostgresqlDatabase)


def is_sqlite():
    return isinstance(database.obj, SqliteDatabase)


def write_transaction():
    """A transaction that writes. On SQLite it takes the write lock at BEGIN, so that what it
    reads cannot change before it writes (two writers otherwise both read, then one fails)."""
    if is_sqlite():
        return database.atomic("IMMEDIATE")
    return database.atomic()


def serialize_on(name):
    """Inside a write transaction: wait for every other transaction serialized on `name`.

    Postgres: a transaction-scoped advisory lock. SQLite: nothing to do, IMMEDIATE already
    serializes every writer."""
    if is_postgres():
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (key,))


def lock_rows_for_share(query):
    """Lock the rows `query` selects against concurrent updates until the transaction ends
    (Postgres); SQLite's IMMEDIATE transactions need nothing more."""
    if is_postgres():
        return query.for_update("FOR SHARE")
    return query


def lock_rows_for_update(query):
    if is_postgres():
        return query.for_update()
    return query


def chunked(iterable, size=CHUNK):
    iterator = iter(iterable)
    while True:
        chunk = list(islice(iterator, size))
        if not chunk:
            return
        yield chunk


def bulk_insert(model, rows, upsert_on=None, ignore_existing=False):
    """Insert dict rows (all with the same keys, plain values) in as few multi-row statements as
    the parameter limits allow; fields left out take their model default. With `upsert_on` (a
    field), a row whose key exists updates it; with `ignore_existing`, it is skipped.

    The SQL is written here, not by the query builder: building it value by value costs more
    than the database spends storing the rows (measured: 7 us a value, 15 s per 150k results).
    """
    if not rows:
        return
    names = list(rows[0])
    defaults = {name: field.default for name, field in model._meta.fields.items()
                if name not in names and field.default is not None and not callable(field.default)}
    columns = [model._meta.fields[name].column_name for name in names]
    per_statement = max(1, MAX_PARAMS // (len(names) + len(defaults)))
    tail = " ON CONFLICT DO NOTHING" if ignore_existing else ""
    if upsert_on is not None:
        key = upsert_on.column_name
        tail = " ON CONFLICT (%s) DO UPDATE SET %s" % (quote(key), ", ".join(
            "%s = excluded.%s" % (quote(c), quote(c)) for c in columns if c != key))
    columns += [model._meta.fields[name].column_name for name in defaults]
    head = "INSERT INTO %s (%s) VALUES " % (quote(model._meta.table_name),
                                           ", ".join(quote(c) for c in columns))
    row_marks = "(%s)" % ", ".join([database.param] * len(columns))
    fixed = list(defaults.values())
    for part in chunked(rows, per_statement):
        params = [value for row in part for value in [row[name] for name in names] + fixed]
        database.execute_sql(head + ", ".join([row_marks] * len(part)) + tail, params)


def quote(identifier):
    return '"%s"' % identifier


@contextlib.contextmanager
def connection():
    """One connection for the duration of a cycle or a command, closed (not leaked) after, so a
    restarted database server costs one failed cycle, not a dead worker."""
    with database.connection_context():
        yield database
