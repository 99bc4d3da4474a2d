"""The database: opened once from DATABASE_URL (playhouse.db_url), its dialect, its\ntransactions and connections."""

import contextlib
import datetime

from peewee import DatabaseProxy, PeeweeException, PostgresqlDatabase, SqliteDatabase
from playhouse import db_url

from bouncer.errors import DatabaseUnavailable
from bouncer.masking import mask_secrets, redact_url
from bouncer.store import dialect as dialects

database = DatabaseProxy()   # bound to the real database by open_database

SQLITE_PRAGMAS = {
    "journal_mode": "wal",        # readers never block the one writer
    "synchronous": "normal",
    "foreign_keys": 1,
    "cache_size": -16 * 1024,     # 16 MiB
    # Deleted rows are overwritten with zeros, so an erased address does not stay readable in
    # the file's free space (see docs/operating.md, "Personal data", for the write-ahead log).
    "secure_delete": 1,
}


def utcnow():
    """Naive UTC: every stored time is UTC, on SQLite and Postgres alike."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class RollbackOnlyWhenOpen:
    """SQLite ends the transaction itself on a full disk or an I/O error, and a connection the
    server dropped has none left. Rolling back again would fail ("no transaction is active",
    "connection already closed") and that error would replace the one that matters."""

    def rollback(self):
        if self.is_closed() or driver_still_in_transaction(self.connection()):
            super().rollback()


def driver_still_in_transaction(raw):
    if getattr(raw, "closed", False):            # psycopg: the server dropped the connection
        return False
    return getattr(raw, "in_transaction", True)  # sqlite3: False once SQLite rolled back


class Sqlite(RollbackOnlyWhenOpen, SqliteDatabase):
    dialect = dialects.SQLITE


class Postgres(RollbackOnlyWhenOpen, PostgresqlDatabase):
    dialect = dialects.POSTGRES


db_url.register_database(Sqlite, "sqlite")
db_url.register_database(Postgres, "postgres", "postgresql")


def open_database(url):
    """Bind the models to the database at `url` (sqlite:///path, postgres[ql]://user:pw@host:port/db
    with libpq options as query parameters) and return it."""
    try:
        db = database_for(url)
    except Exception as exc:
        raise DatabaseUnavailable("cannot open database %s: %s" % (redact_url(url), exc)) from None
    database.initialize(db)
    return db


def database_for(url):
    if url.startswith("sqlite"):
        return db_url.connect(url, pragmas=SQLITE_PRAGMAS, timeout=dialects.BUSY_TIMEOUT)
    # libpq waits forever for a server that stops answering: give up after this many seconds
    # instead of hanging a worker or a command. A connect_timeout in DATABASE_URL wins.
    timeout = db_url.parse(url, True, True).get("connect_timeout", 10)
    return db_url.connect(url, True, True, connect_timeout=timeout)


def dialect():
    """The SQL that differs, for the database that is open (store/dialect.py)."""
    return database.obj.dialect


def write_transaction():
    """A transaction that writes. On SQLite it takes the write lock at BEGIN, so that what it
    reads cannot change before it writes (two writers otherwise both read, then one fails)."""
    return dialect().write_transaction(database)


def serialize_on(name, shared=False):
    """Inside a write transaction: wait for every other transaction serialized on `name`
    (PostgreSQL: an advisory lock; SQLite: every writer is serialized already). `shared`: wait
    only for those that are not shared, so that shared holders run side by side."""
    dialect().serialize_on(database, name, shared)


def lock_rows_for_share(query):
    """Lock the rows `query` selects against concurrent updates until the transaction ends
    (PostgreSQL; SQLite's IMMEDIATE transactions need nothing more)."""
    return dialect().for_share(query)


def lock_rows_for_update(query):
    return dialect().for_update(query)


def lock_rows_for_change(query):
    """Lock the rows `query` selects as an UPDATE of them would, until the transaction ends;
    rows referring to them may still be written (PostgreSQL; nothing on SQLite, as above)."""
    return dialect().for_change(query)


def scrub_erased_pages():
    """After an erasure: no copy of what it deleted is left in the database's files that the
    database can remove (SQLite: the write-ahead log's old pages). Returns what is left, in words,
    or None."""
    return dialect().scrub_erased_pages(database)


def let_go_after_fork():
    """In a forked process that never queries: let go of the parent's connection without a word
    to the server (see the dialect's)."""
    dialect().let_go_after_fork(database)


@contextlib.contextmanager
def connection():
    """A fresh connection for the duration of a cycle or a command, closed after, errors
    included, so a restarted database server costs one failed cycle, not a dead worker. Inside a
    transaction it is the caller's connection, used as it is."""
    if database.in_transaction():
        yield database
        return
    if not database.is_closed():
        # Opened by a query outside any cycle: it may predate a server restart and be dead.
        database.close()
    try:
        database.connect()
    except PeeweeException as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = mask_secrets(reason, [str(database.obj.connect_params.get("password") or "")])
        raise DatabaseUnavailable(
            "cannot open database %r: %s" % (database.obj.database, reason)) from None
    try:
        yield database
    finally:
        database.close()


