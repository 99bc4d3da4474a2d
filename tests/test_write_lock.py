"""SQLite's one write lock: a writer that finds it taken asks again every millisecond (not in
SQLite's busy handler, whose sleeps grow to 100 ms), enters once it is free, and gives up with
"database is locked" after its patience; the connection's own busy timeout is kept."""
import sqlite3
import threading

import pytest
from peewee import OperationalError

from bouncer.store import dialect as dialects
from bouncer.store.database import database, write_transaction


@pytest.fixture
def sqlite_file(database_url, db):
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite's write lock")
    database.execute_sql("CREATE TABLE IF NOT EXISTS lock_probe (x INTEGER)")
    return database_url[len("sqlite:///"):]


@pytest.fixture
def other_writer(sqlite_file):
    """Another process's connection holding the write lock until `.release()`."""
    conn = sqlite3.connect(sqlite_file, isolation_level=None, timeout=5)
    conn.execute("BEGIN IMMEDIATE")
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


def busy_timeout():
    return database.execute_sql("PRAGMA busy_timeout").fetchone()[0]


def test_a_writer_waits_for_the_lock_and_enters_once_it_is_free(other_writer):
    entered = threading.Event()

    def write():
        with database.connection_context(), write_transaction():
            database.execute_sql("INSERT INTO lock_probe VALUES (1)")
            entered.set()

    writer = threading.Thread(target=write)
    writer.start()
    assert not entered.wait(0.3)          # the lock is taken: it waits
    other_writer.execute("COMMIT")
    assert entered.wait(10)
    writer.join(10)
    assert database.execute_sql("SELECT COUNT(*) FROM lock_probe").fetchone()[0] == 1
    assert busy_timeout() == dialects.BUSY_TIMEOUT * 1000


def test_a_writer_gives_up_after_its_patience_and_keeps_its_busy_timeout(other_writer):
    transaction = database.atomic("IMMEDIATE")
    with pytest.raises(OperationalError, match="locked"):
        dialects.begin_when_free(database, transaction, patience=0.05)
    assert database.transaction_depth() == 0 and busy_timeout() == dialects.BUSY_TIMEOUT * 1000


def test_a_nested_write_transaction_is_a_savepoint_of_the_one_around_it(sqlite_file):
    with write_transaction():
        database.execute_sql("INSERT INTO lock_probe VALUES (1)")
        with pytest.raises(ValueError), write_transaction():
            database.execute_sql("INSERT INTO lock_probe VALUES (2)")
            raise ValueError("rolled back to the savepoint")
    assert [x for (x,) in database.execute_sql("SELECT x FROM lock_probe").fetchall()] == [1]


def test_a_write_transaction_rolled_back_by_its_holder_writes_nothing(sqlite_file):
    with write_transaction() as transaction:
        database.execute_sql("INSERT INTO lock_probe VALUES (1)")
        transaction.rollback()
    assert database.execute_sql("SELECT COUNT(*) FROM lock_probe").fetchone()[0] == 0
