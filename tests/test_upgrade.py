"""`init-db` on a database made by an earlier release (schema versions 1 and 2, frozen in
tests/data) upgrades it in place: every row of every state is kept, and the queue carries on
with them."""
import datetime
from pathlib import Path

import pytest
from conftest import (
    POSTGRES_URL, make_settings, on_postgres, postgres_admin, rode_on, row_states, statuses, with_settings,
)

from bouncer.app import App
from bouncer.client import BouncerClient
from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.reading.batches import batch_status, iter_results
from bouncer.sandbox.simulator import verdict_for
from bouncer.store.database import database, open_database
from bouncer.store.migrations import RETIRED_INDEXES, create_schema, upgrade_to_5
from bouncer.store.models import BouncerBatch, BouncerBatchEmail, QueuedEmail, UserBatch, UserBatchEmail
from bouncer.store.schema import ROWS_FILLFACTOR, VERSION, current_version
from bouncer.web import create_web_app

DATA = Path(__file__).parent / "data"
T = "2026-11-20 10:00:00"

# Rows of every state the first release knew: user batches queued, processing, completed and
# failed; rows queued, sent, done, invalid and failed, numbered from 0; the ledger reserved,
# outstanding, completed, rejected and abandoned; addresses in flight; verdicts.
V1_ROWS = [
    "INSERT INTO emails_global (id, email, created_at) VALUES"
    " (1, 'a@example.com', '%(t)s'), (2, 'b@example.com', '%(t)s'), (3, 'c@example.com', '%(t)s'),"
    " (4, 'd@example.com', '%(t)s'), (5, 'e@example.com', '%(t)s')",
    'INSERT INTO user_batches (id, "user", check_type, status, total, invalid, duplicates, created_at,'
    " completed_at, failure_reason) VALUES"
    " (1, 'alice', 'deliverable', 'completed', 2, 1, 0, '%(t)s', '%(t)s', NULL),"
    " (2, 'bob', 'deliverable', 'processing', 3, 0, 1, '%(t)s', NULL, NULL),"
    " (3, 'carol', 'catchall', 'queued', 1, 0, 0, '%(t)s', NULL, NULL),"
    " (4, 'dave', 'deliverable', 'failed', 1, 0, 0, '%(t)s', '%(t)s', 'Bouncer no longer knows batch x (404)')",
    "INSERT INTO bouncer_batches (id, check_type, status, bouncer_id, quantity, reserved_at, sent_at,"
    " last_checked_at, bouncer_status, finished_at, failure_reason) VALUES"
    " (1, 'deliverable', 'completed', 'bz-1', 1, '%(t)s', '%(t)s', '%(t)s', 'completed', '%(t)s', NULL),"
    " (2, 'deliverable', 'outstanding', 'bz-2', 2, '%(t)s', '%(t)s', NULL, NULL, NULL, NULL),"
    " (3, 'deliverable', 'rejected', NULL, 1, '%(t)s', NULL, NULL, NULL, '%(t)s', 'HTTP 500'),"
    " (4, 'deliverable', 'abandoned', NULL, 1, '%(t)s', NULL, NULL, NULL, '%(t)s', 'timed out'),"
    " (5, 'deliverable', 'failed', 'bz-5', 1, '%(t)s', '%(t)s', NULL, NULL, '%(t)s', '404')",
    "INSERT INTO bouncer_batch_emails (bouncer_batch_id, email_global_id, check_type, email_sent) VALUES"
    " (2, 2, 'deliverable', 'b@example.com'), (2, 3, 'deliverable', 'c@example.com')",
    "INSERT INTO user_batch_emails (batch_id, position, email, email_global_id, check_type, status,"
    " bouncer_batch_id, failure_reason, completed_at) VALUES"
    " (1, 0, 'a@example.com', 1, 'deliverable', 'done', 1, NULL, '%(t)s'),"
    " (1, 1, 'not an address', NULL, 'deliverable', 'invalid', NULL, 'no @-sign', '%(t)s'),"
    " (2, 0, 'b@example.com', 2, 'deliverable', 'sent', 2, NULL, NULL),"
    " (2, 1, 'c@example.com', 3, 'deliverable', 'sent', 2, NULL, NULL),"
    " (2, 2, 'B@example.com', 2, 'deliverable', 'sent', 2, NULL, NULL),"
    " (3, 0, 'd@example.com', 4, 'catchall', 'queued', NULL, NULL, NULL),"
    " (4, 0, 'e@example.com', 5, 'deliverable', 'failed', 5, 'Bouncer no longer knows batch x (404)', '%(t)s')",
    "INSERT INTO email_deliverable_results (email_global_id, status, reason, score, raw, checked_at,"
    " bouncer_batch_id) VALUES (1, 'deliverable', 'accepted_email', 95, '{}', '%(t)s', 1)",
    "INSERT INTO rate_limit_tracker (requested_at, kind, check_type) VALUES ('%(t)s', 'create', 'deliverable')",
]


def frozen_database(kind, tmp_path, version, statements, rows):
    """A database as release `version` made it (its schema's `statements`), holding `rows`;
    yields its URL and drops it after."""
    if kind == "sqlite":
        url = "sqlite:///%s" % (tmp_path / ("v%d.db" % version))
    else:
        url = POSTGRES_URL + "_v%d" % version
        postgres_admin(url, 'DROP DATABASE IF EXISTS "%(name)s" WITH (FORCE)')
        postgres_admin(url, 'CREATE DATABASE "%(name)s"')
    open_database(url)
    with database.connection_context():
        for statement in statements:
            database.execute_sql(statement)
        for statement in rows:
            database.execute_sql(statement % {"t": T})
        if kind == "postgres":   # as the release's own inserts would have left them
            for table in ("emails_global", "user_batches", "user_batch_emails", "bouncer_batches"):
                database.execute_sql("SELECT setval(pg_get_serial_sequence('%s', 'id'), (SELECT max(id) FROM %s))"
                                     % (table, table))
    yield url
    database.close()
    if kind == "postgres":
        postgres_admin(url, 'DROP DATABASE IF EXISTS "%(name)s" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def v1_database(request, tmp_path):
    """A database made by the first release, with rows of every state."""
    lines = (DATA / ("schema_v1_%s.sql" % request.param)).read_text().splitlines()
    schema = "\n".join(line for line in lines if not line.startswith("--"))
    yield from frozen_database(request.param, tmp_path, 1, [s for s in schema.split(";") if s.strip()], V1_ROWS)


def counts():
    tables = ["emails_global", "user_batches", "user_batch_emails", "bouncer_batches", "bouncer_batch_emails",
              "email_deliverable_results", "rate_limit_tracker"]
    return {t: database.execute_sql('SELECT count(*) FROM "%s"' % t).fetchone()[0] for t in tables}


def test_init_db_upgrades_a_version_1_database_keeping_every_row(v1_database):
    with database.connection_context():
        assert current_version() == 1
        before = counts()
        assert create_schema() == "schema upgraded from version 1 to %d" % VERSION
        assert create_schema() == "schema up to date (version %d)" % VERSION
        assert counts() == before
        batches = {b.id: (b.user_id, b.check_type, b.status, b.total, b.invalid, b.duplicates, b.fifo_order)
                   for b in UserBatch.select()}
        assert batches == {1: ("alice", "deliverable", "completed", 2, 1, 0, 1),
                           2: ("bob", "deliverable", "processing", 3, 0, 1, 2),
                           3: ("carol", "catchall", "queued", 1, 0, 0, 3),
                           4: ("dave", "deliverable", "failed", 1, 0, 0, 4)}
        states = row_states()
        rows = [(r.batch_id, r.position, states[r.id], r.fifo_order) for r in
                UserBatchEmail.select().order_by(UserBatchEmail.batch, UserBatchEmail.position)]
        assert rows == [(1, 1, "done", 1), (1, 2, "invalid", 1), (2, 1, "sent", 2), (2, 2, "sent", 2),
                        (2, 3, "sent", 2), (3, 1, "queued", 3), (4, 1, "failed", 4)]
        assert set(rode_on().values()) == {1, 2, 5}
        assert batch_status(1)["counts"]["deliverable"] == 1
        assert [r["status"] for r in iter_results(1)] == ["deliverable", "invalid"]
        assert batch_status(4)["failure_reason"].startswith("Bouncer no longer knows")
        assert [b.status for b in BouncerBatch.select().order_by(BouncerBatch.id)] == [
            "completed", "outstanding", "rejected", "abandoned", "failed"]


def upgraded_app(url, redis_conn):
    """The service on the database at `url` after `init-db` upgraded it."""
    settings = make_settings(url)
    app = App(settings, redis=redis_conn, client=BouncerClient(settings.api_url, settings.api_key))
    with database.connection_context():
        create_schema()
    database.connect(reuse_if_open=True)
    return app


def test_upgraded_database_takes_host_rows_and_carries_on(v1_database, redis_conn, bouncer):
    app = upgraded_app(v1_database, redis_conn)
    # The new defaults hold for a host's plain insert.
    database.execute_sql("INSERT INTO user_batches (user_id, check_type) VALUES ('erin', 'catchall')")
    erin = UserBatch.select().order_by(UserBatch.id.desc()).get()
    assert erin.status == "new" and erin.created_at > datetime.datetime(2026, 11, 21)
    database.execute_sql("INSERT INTO user_batch_emails (batch_id, position, email) VALUES (%d, 1, 'f@example.com')"
                         % erin.id)
    # Carol's queued row and Erin's new one go out, catchall, oldest first; a new batch takes a
    # place after every upgraded one.
    run_cycle(app, CREATION, "catchall")
    assert bouncer.sent_addresses() == ["d@example.com", "f@example.com"]
    assert UserBatch.get_by_id(erin.id).fifo_order == 5
    bouncer.complete_now()
    run_cycle(app, STATUS, "catchall")
    assert batch_status(3)["status"] == batch_status(erin.id)["status"] == "completed"


def result_indexes():
    """Index names on the results tables, from the database's own catalogue."""
    return indexes_of("email_deliverable_results", "email_catchall_results")


def indexes_of(*tables):
    """Index names on `tables`, from the database's own catalogue."""
    if on_postgres():
        return {name for table in tables for (name,) in database.execute_sql(
            "SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,)).fetchall()}
    return {name for table in tables for (name,) in database.execute_sql(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,)).fetchall()}


def test_an_index_no_query_reads_is_dropped_by_init_db(v1_database):
    with database.connection_context():
        create_schema()
        assert not result_indexes() & set(RETIRED_INDEXES)    # gone from an upgraded database
        database.execute_sql('CREATE INDEX "%s" ON email_deliverable_results (bouncer_batch_id)'
                             % RETIRED_INDEXES[0])
        assert create_schema() == "schema up to date (version %d)" % VERSION
        assert not result_indexes() & set(RETIRED_INDEXES)    # and from one made before it retired


# Release 2's rows of the states it had and 3 keeps apart: bob's batch has two rows waiting in
# line, two riding on an outstanding Bouncer batch (a repeat of one address among them), one
# parked on a rejected attempt and one done.
V2_ROWS = [
    "INSERT INTO schema_version (version) VALUES (2)",
    "INSERT INTO fifo_counter (last) VALUES (1)",
    "INSERT INTO emails_global (id, email, created_at) VALUES (1, 'a@example.com', '%(t)s'),"
    " (2, 'b@example.com', '%(t)s'), (3, 'c@example.com', '%(t)s'), (4, 'd@example.com', '%(t)s'),"
    " (5, 'e@example.com', '%(t)s')",
    "INSERT INTO user_batches (id, user_id, check_type, status, total, fifo_order, source, created_at)"
    " VALUES (1, 'bob', 'deliverable', 'processing', 6, 1, 'cli', '%(t)s')",
    "INSERT INTO bouncer_batches (id, check_type, status, bouncer_id, quantity, reserved_at, sent_at,"
    " finished_at) VALUES (1, 'deliverable', 'completed', 'bz-1', 1, '%(t)s', '%(t)s', '%(t)s'),"
    " (2, 'deliverable', 'outstanding', 'bz-2', 1, '%(t)s', '%(t)s', NULL),"
    " (3, 'deliverable', 'rejected', NULL, 1, '%(t)s', NULL, '%(t)s')",
    "INSERT INTO bouncer_batch_emails (bouncer_batch_id, email_global_id, check_type, email_sent)"
    " VALUES (2, 2, 'deliverable', 'b@example.com')",
    "INSERT INTO user_batch_emails (batch_id, position, email, status, email_global_id, check_type,"
    " fifo_order, bouncer_batch_id, completed_at) VALUES"
    " (1, 1, 'a@example.com', 'done', 1, 'deliverable', 1, 1, '%(t)s'),"
    " (1, 2, 'b@example.com', 'sent', 2, 'deliverable', 1, 2, NULL),"
    " (1, 3, 'B@example.com', 'sent', 2, 'deliverable', 1, 2, NULL),"
    " (1, 4, 'c@example.com', 'sent', 3, 'deliverable', 1, 3, NULL),"
    " (1, 5, 'd@example.com', 'queued', 4, 'deliverable', 1, NULL, NULL),"
    " (1, 6, 'e@example.com', 'queued', 5, 'deliverable', 1, NULL, NULL)",
    "INSERT INTO email_deliverable_results (email_global_id, status, raw, checked_at, bouncer_batch_id)"
    " VALUES (1, 'deliverable', '{}', '%(t)s', 1)",
]


@pytest.fixture(params=["sqlite", "postgres"])
def v2_database(request, tmp_path):
    """A database made by release 2, with rows of every state."""
    yield from frozen_database(request.param, tmp_path, 2, statements_a_line(2, request.param), V2_ROWS)


def statements_a_line(version, kind):
    """The frozen schema of release `version`, one statement a line (its triggers hold a
    semicolon)."""
    lines = (DATA / ("schema_v%d_%s.sql" % (version, kind))).read_text().splitlines()
    return [line.rstrip(";") for line in lines if line and not line.startswith("--")]


def test_init_db_upgrades_a_version_2_database_into_the_line_and_the_riding_rows(v2_database):
    with database.connection_context():
        assert current_version() == 2
        assert create_schema() == "schema upgraded from version 2 to %d" % VERSION
        assert create_schema() == "schema up to date (version %d)" % VERSION
        states = row_states()   # every queued row is in line or riding, never both
        assert [states[r] for (r,) in UserBatchEmail.select(UserBatchEmail.id).order_by(UserBatchEmail.position)
                .tuples()] == ["done", "sent", "sent", "sent", "queued", "queued"]
        assert sorted(rode_on().values()) == [1, 2, 2, 3]
        assert [q.email for q in QueuedEmail.select().order_by(QueuedEmail.position)] == ["d@example.com",
                                                                                          "e@example.com"]
        assert [(a.bouncer_batch_id, a.email_global_id) for a in BouncerBatchEmail.select()] == [(2, 2)]
        assert batch_status(1)["counts"]["pending"] == 5
        assert "user_batch_emails_bouncer_batch" not in indexes_of("user_batch_emails")


def test_upgraded_version_2_database_carries_on_to_the_end(v2_database, redis_conn, bouncer):
    app = upgraded_app(v2_database, redis_conn)
    # The row parked on the rejected attempt goes back in line first, where it was, then the two
    # waiting ones; the rows on the outstanding batch wait for it.
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.sent_addresses() == ["c@example.com", "d@example.com", "e@example.com"]
    assert statuses(1) == {"done": 1, "sent": 5}
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    # bz-2 was made by another Bouncer than this sandbox: it answers 404, and its two rows fail.
    assert statuses(1) == {"done": 4, "failed": 2}
    assert batch_status(1)["status"] == "failed"


# Release 3's rows: bob's batch has one row done and two waiting in line; carol's batch was
# cancelled before it was admitted (its row kept no check type); dave's was written by a host and
# not yet admitted, one valid row and one not.
V3_ROWS = [
    "INSERT INTO schema_version (version) VALUES (3)",
    "INSERT INTO fifo_counter (last) VALUES (1)",
    "INSERT INTO emails_global (id, email, created_at) VALUES (1, 'a@example.com', '%(t)s'),"
    " (2, 'b@example.com', '%(t)s'), (3, 'c@example.com', '%(t)s')",
    "INSERT INTO user_batches (id, user_id, check_type, status, total, fifo_order, source, created_at,"
    " cancelled_at, completed_at) VALUES"
    " (1, 'bob', 'deliverable', 'processing', 3, 1, 'cli', '%(t)s', NULL, NULL),"
    " (2, 'carol', 'deliverable', 'cancelled', 0, NULL, 'api', '%(t)s', '%(t)s', '%(t)s'),"
    " (3, 'dave', 'deliverable', 'new', 0, NULL, NULL, '%(t)s', NULL, NULL)",
    "INSERT INTO bouncer_batches (id, check_type, status, bouncer_id, quantity, reserved_at, sent_at,"
    " finished_at) VALUES (1, 'deliverable', 'completed', 'bz-1', 1, '%(t)s', '%(t)s', '%(t)s')",
    "INSERT INTO user_batch_emails (id, batch_id, position, email, status, email_global_id, check_type,"
    " fifo_order, bouncer_batch_id, completed_at) VALUES"
    " (1, 1, 1, 'a@example.com', 'done', 1, 'deliverable', 1, 1, '%(t)s'),"
    " (2, 1, 2, 'b@example.com', 'queued', 2, 'deliverable', 1, NULL, NULL),"
    " (3, 1, 3, 'c@example.com', 'queued', 3, 'deliverable', 1, NULL, NULL),"
    " (4, 2, 1, 'x@example.com', 'cancelled', NULL, NULL, NULL, NULL, '%(t)s'),"
    " (5, 3, 1, 'd@example.com', 'new', NULL, NULL, NULL, NULL, NULL),"
    " (6, 3, 2, 'not an address', 'new', NULL, NULL, NULL, NULL, NULL)",
    "INSERT INTO queued_emails (row_id, batch_id, check_type, fifo_order, position, email_global_id, email)"
    " VALUES (2, 1, 'deliverable', 1, 2, 2, 'b@example.com'), (3, 1, 'deliverable', 1, 3, 3, 'c@example.com')",
    "INSERT INTO email_deliverable_results (email_global_id, status, raw, checked_at, bouncer_batch_id)"
    " VALUES (1, 'deliverable', '{}', '%(t)s', 1)",
]


@pytest.fixture(params=["sqlite", "postgres"])
def v3_database(request, tmp_path):
    """A database made by release 3 (its statements as its init-db ran them)."""
    yield from frozen_database(request.param, tmp_path, 3, statements_a_line(3, request.param), V3_ROWS)


def rows_fillfactor():
    """The fillfactor of `user_batch_emails` on PostgreSQL (None: the default, every page full)."""
    options = database.execute_sql("SELECT reloptions FROM pg_class WHERE relname = 'user_batch_emails'").fetchone()[0]
    return next((int(o.split("=")[1]) for o in options or () if o.startswith("fillfactor=")), None)


def test_init_db_upgrades_a_version_3_database_to_indexes_that_do_not_hold_a_rows_status(v3_database):
    with database.connection_context():
        before = counts()
        assert create_schema() == "schema upgraded from version 3 to %d" % VERSION
        assert create_schema() == "schema up to date (version %d)" % VERSION
        assert counts() == before
        indexes = indexes_of("user_batch_emails")
        assert "user_batch_emails_unadmitted" in indexes
        assert not indexes & {"user_batch_emails_new", "user_batch_emails_pending"}
        # The row cancelled before admission took its batch's check type, as every row that left
        # `new` has; the rows still to admit are the only ones without one.
        assert UserBatchEmail.get_by_id(4).check_type == "deliverable"
        assert [r.id for r in UserBatchEmail.select().where(UserBatchEmail.check_type.is_null())] == [5, 6]
        if on_postgres():
            assert rows_fillfactor() == ROWS_FILLFACTOR
        assert batch_status(1)["counts"]["pending"] == 2
        assert [r["status"] for r in iter_results(3)] == ["pending", "pending"]


def test_upgraded_version_3_database_admits_sends_and_ends_every_batch(v3_database, redis_conn, bouncer):
    app = upgraded_app(v3_database, redis_conn)
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.sent_addresses() == ["b@example.com", "c@example.com", "d@example.com"]
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert statuses(1) == {"done": 3}
    assert statuses(3) == {"done": 1, "invalid": 1}
    assert batch_status(1)["status"] == batch_status(3)["status"] == "completed"
    assert batch_status(2)["status"] == "cancelled"


# Release 4's rows: as release 3's, the row cancelled before admission holding its batch's check
# type (release 4 gave it one).
CANCELLED_V3 = "'x@example.com', 'cancelled', NULL, NULL,"
CANCELLED_V4 = "'x@example.com', 'cancelled', NULL, 'deliverable',"
V4_ROWS = [s.replace("VALUES (3)", "VALUES (4)").replace(CANCELLED_V3, CANCELLED_V4) for s in V3_ROWS]
assert sum(CANCELLED_V4 in s for s in V4_ROWS) == 1


@pytest.fixture(params=["sqlite", "postgres"])
def v4_database(request, tmp_path):
    """A database made by release 4 (its statements as its init-db ran them)."""
    yield from frozen_database(request.param, tmp_path, 4, statements_a_line(4, request.param), V4_ROWS)


def test_init_db_brings_a_version_4_database_to_this_release_keeping_every_row(v4_database, redis_conn, bouncer):
    with database.connection_context():
        before = counts()
        assert create_schema() in ("schema up to date (version 4)", "schema upgraded from version 4 to %d" % VERSION)
        assert create_schema() == "schema up to date (version %d)" % VERSION
        assert counts() == before
    app = upgraded_app(v4_database, redis_conn)
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.sent_addresses() == ["b@example.com", "c@example.com", "d@example.com"]
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert statuses(1) == {"done": 3} and statuses(3) == {"done": 1, "invalid": 1}
    assert batch_status(2)["status"] == "cancelled"


def test_init_db_gives_a_database_of_this_version_made_with_half_of_each_page_free_this_releases_room(v4_database):
    # A database already at version 5 from a release that kept half of each page of
    # user_batch_emails free goes through init-db's "up to date" path, and gets the room too.
    with database.connection_context():
        create_schema()
        if on_postgres():
            database.execute_sql("ALTER TABLE user_batch_emails SET (fillfactor = 50)")
        assert create_schema() == "schema up to date (version %d)" % VERSION
        if on_postgres():
            assert rows_fillfactor() == ROWS_FILLFACTOR


def test_a_version_4_database_gains_what_erasure_and_retention_need(v4_database, redis_conn, bouncer):
    """Version 5: a pruned batch keeps its counts on it, and the rows naming an address are
    found by their index; then forget and prune work on release 4's rows."""
    with database.connection_context():
        assert current_version() == 4
        assert create_schema() == "schema upgraded from version 4 to %d" % VERSION
        assert current_version() == VERSION == 5
        assert {"pruned_at", "kept_counts"} <= {c.name for c in database.get_columns("user_batches")}
        assert "user_batch_emails_address" in indexes_of("user_batch_emails")
        if on_postgres():   # release 4 kept half of each page free; pages from now on keep this release's room
            assert rows_fillfactor() == ROWS_FILLFACTOR
        with database.atomic():
            upgrade_to_5()                                   # safe to run again
    app = upgraded_app(v4_database, redis_conn)
    from bouncer.services import erasure
    assert erasure.forget_user(app, "bob", who="test").erased.rows == 3
    assert not UserBatch.select().where(UserBatch.user_id == "bob").exists()
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert statuses(3) == {"done": 1, "invalid": 1}
    UserBatch.update(completed_at=datetime.datetime(2020, 1, 1)).where(UserBatch.id == 3).execute()
    UserBatch.update(completed_at=datetime.datetime.now()).where(UserBatch.id == 2).execute()
    assert erasure.prune(app, who="test", days=30).batches == 1      # dave's; carol's ended within the period
    assert batch_status(3)["counts"]["invalid"] == 1 and batch_status(3)["pruned_at"]


# What version 5 adds for Bouncer's batch lifecycle, by table.


LIFECYCLE_COLUMNS = {
    "bouncer_batches": {"finish_reason", "finish_asked_at", "finish_accepted_at", "credits", "refunded", "rechecks",
                        "deleted_at"},
    "user_batch_emails": {"rechecks"},
    "queued_emails": {"rechecks", "not_before"},
    "email_deliverable_results": {"retry_after"},
    "email_catchall_results": {"retry_after"},
}


def columns_of(table):
    return {column.name for column in database.get_columns(table)}


def test_a_version_4_database_gains_the_batch_lifecycle_and_carries_on_with_it(v4_database, redis_conn, bouncer):
    with database.connection_context():
        assert all(not columns & columns_of(table) for table, columns in LIFECYCLE_COLUMNS.items())
        create_schema()
        for table, columns in LIFECYCLE_COLUMNS.items():
            assert columns <= columns_of(table), table
        assert "bouncer_batches_undeleted" in indexes_of("bouncer_batches")
        with database.atomic():
            upgrade_to_5()                                  # safe to run again
        assert QueuedEmail.select().where(QueuedEmail.rechecks != 0).count() == 0   # the rows in line kept
    app = upgraded_app(v4_database, redis_conn)
    bouncer.greylist_rate, bouncer.greylist_seconds = 1.0, 0    # tried again at once
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert statuses(1) == {"done": 1, "queued": 2} and batch_status(1)["rechecking"] == 2
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.sent_addresses()[3:] == ["b@example.com", "c@example.com", "d@example.com"]
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert statuses(1) == {"done": 3} and statuses(3) == {"done": 1, "invalid": 1}
    assert [r["status"] for r in iter_results(1)] == ["deliverable"] + [
        verdict_for(e)["status"] for e in ("b@example.com", "c@example.com")]
    assert BouncerBatch.select().where(BouncerBatch.rechecks > 0).count() == 1


def test_init_db_gives_a_version_4_line_its_users_and_turns_and_makes_the_fair_share_tables(
        v4_database, redis_conn, bouncer):
    from peewee import IntegrityError

    from bouncer.store.models import LineOrder, UserWeight
    with database.connection_context():
        assert create_schema() == "schema upgraded from version 4 to %d" % VERSION
        # Bob's two rows in line know their user, and keep turn 0: the line is the FIFO it was.
        assert sorted(QueuedEmail.select(QueuedEmail.row, QueuedEmail.user_id, QueuedEmail.turn).tuples()) == [
            (2, "bob", 0.0), (3, "bob", 0.0)]
        assert indexes_of("queued_emails") >= {"queued_emails_check_type_turn_fifo_order_position",
                                              "queued_emails_check_type_user_id_fifo_order_position"}
        assert "queued_emails_check_type_fifo_order_position" not in indexes_of("queued_emails")
        assert UserWeight.select().count() == 0 and LineOrder.select().count() == 0
        with pytest.raises(IntegrityError), database.atomic():
            database.execute_sql("INSERT INTO user_weights (user_id, weight) VALUES ('bob', 0)")
    app = upgraded_app(v4_database, redis_conn)
    app = App(app.settings.replace(queue_policy="fair"), redis=redis_conn, client=app.client)
    database.execute_sql("INSERT INTO user_weights (user_id, weight) VALUES ('bob', 2)")
    report = run_cycle(app, CREATION, "deliverable")
    assert report.reordered == 3           # bob's two rows, and dave's admitted by this cycle
    # Bob (weight 2) and dave take turns from the start: bob's first, dave's, bob's second.
    assert bouncer.sent_addresses() == ["b@example.com", "d@example.com", "c@example.com"]


def test_a_version_4_database_gains_the_api_token_of_each_batch(v4_database, redis_conn, bouncer):
    """Tenants on the HTTP door: release 4's batches belong to no token; a batch made over the API
    after the upgrade belongs to its token, and each token lists its own."""
    with database.connection_context():
        assert create_schema() == "schema upgraded from version 4 to %d" % VERSION
        assert "user_batches_api_token" in indexes_of("user_batches")
        assert {b.api_token_digest for b in UserBatch.select()} == {None}
    app = upgraded_app(v4_database, redis_conn)
    tokens = ("tok-upgrade-a-1234", "tok-upgrade-b-5678")
    client = create_web_app(with_settings(app, api_tokens=tokens)).test_client()
    made = client.post("/api/v1/batches?user_id=erin&check_type=deliverable", data="e@example.com\n",
                       headers={"Authorization": "Bearer %s" % tokens[0]}, content_type="text/plain")
    assert made.status_code == 201
    listing = {token: [b["batch_id"] for b in client.get("/api/v1/batches", headers={
        "Authorization": "Bearer %s" % token}).get_json()["batches"]] for token in tokens}
    assert listing == {tokens[0]: [made.get_json()["batch_id"]], tokens[1]: []}
    assert client.get("/api/v1/batches/1", headers={"Authorization": "Bearer %s" % tokens[0]}).status_code == 404
