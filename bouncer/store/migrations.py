"""The schema created by `init-db`, or an earlier release's upgraded in place (schema.py holds
this release's definitions).

Versions (table `schema_version`): 1, the first release (`user_batches.user`, no defaults, rows
numbered from 0); 2, the host tables with their defaults and checks, a row `sent` while it rides
on a Bouncer batch; 3, the line (`queued_emails`) and the rows riding on Bouncer batches
(`riding_rows`) are tables of their own, so a claim no longer rewrites the rows it takes; 4, no
index of `user_batch_emails` depends on a row's status, and on PostgreSQL its pages keep
room, so ending a row rewrites it in place (a HOT update) rather than adding an entry to each of
its indexes; 5, this release: see `upgrade_to_5`, one part per feature.
"""

import logging

from bouncer.store.database import database, dialect, write_transaction
from bouncer.store.models import (
    INTERNAL_MODELS, FifoCounter, LineOrder, LineWeight, QueuedEmail, SchemaVersion, SentShare, UserWeight,
)
from bouncer.store.schema import (
    ADDRESS_INDEX, API_TOKEN_INDEX, CHECKS, INDEXES, NEW_ROW_CHECK, NEW_ROW_RULE, RESULTS_VIEW,
    ROWS_FILLFACTOR, SQLITE_TRIGGERS, UNADMITTED_INDEX, UNDELETED_INDEX, USER_BATCH_EMAILS, USER_BATCHES,
    VERSION, create_all, current_version, host_triggers, render,
)

log = logging.getLogger(__name__)


def create_schema():
    """Create the schema, or bring an earlier release's up to this one; safe to run again."""
    with database.connection_context():
        version = current_version()
        if version == VERSION:
            database.create_tables(INTERNAL_MODELS, safe=True)   # any the version gained since
            drop_retired_indexes()
            keep_rows_fillfactor()
            return "schema up to date (version %d)" % VERSION
        if version is None:
            create_all()
            return "schema created (version %d)" % VERSION
        if version > VERSION:
            raise RuntimeError("the database's schema is version %d, newer than this release's %d"
                               % (version, VERSION))
        upgrade_from(version)
        keep_rows_fillfactor()
        return "schema upgraded from version %d to %d" % (version, VERSION)


def upgrade_from(version):
    """Versions 1 to 3 are brought to 4 in one step each; from 4 on, each version's step runs in
    turn (STEPS), each in a transaction of its own that also records the version it reached."""
    log.warning("Upgrading the schema from version %d to %d", version, VERSION)
    if version < 4:
        TO_VERSION_4[version]()
    for reached in range(max(version, 4) + 1, VERSION + 1):
        with write_transaction():
            STEPS[reached]()
            SchemaVersion.update(version=reached).execute()


def upgrade_from_2():
    """Version 2 walked the queued rows of `user_batch_emails` itself and marked the rows it sent
    `sent`: its queued rows join the line, its sent rows ride on their Bouncer batch."""
    with write_transaction():
        upgrade_queue_tables()
        database.execute_sql('DROP INDEX IF EXISTS "user_batch_emails_fifo"')
        upgrade_rows_table()
        SchemaVersion.update(version=4).execute()


def upgrade_from_3():
    with write_transaction():
        upgrade_rows_table()
        SchemaVersion.update(version=4).execute()


def upgrade_from_1():
    if dialect().name == "postgres":
        upgrade_postgres_from_1()
    else:
        upgrade_sqlite_from_1()


def upgrade_rows_table():
    """From version 1, 2 or 3: rows cancelled before admission take their batch's check type,
    as every row that left `new` has; the rows to admit are found by that, and no index asks a
    row's status any more; on PostgreSQL the table's new pages keep room for rewrites in place
    (pages already written are as they were)."""
    database.execute_sql("UPDATE user_batch_emails SET check_type = (SELECT b.check_type FROM user_batches b"
                         " WHERE b.id = user_batch_emails.batch_id) WHERE check_type IS NULL AND status <> 'new'")
    database.execute_sql(UNADMITTED_INDEX)
    if dialect().name == "postgres":
        database.execute_sql("ALTER TABLE user_batch_emails SET (fillfactor = %d)" % ROWS_FILLFACTOR)
        database.execute_sql('ALTER TABLE user_batch_emails DROP CONSTRAINT IF EXISTS "%s",'
                             ' ADD CONSTRAINT "%s" CHECK (%s)' % (NEW_ROW_CHECK, NEW_ROW_CHECK, NEW_ROW_RULE))
    else:
        for statement in SQLITE_TRIGGERS:
            database.execute_sql(statement)
    drop_retired_indexes()


def upgrade_queue_tables():
    """From version 1 or 2: the addresses in flight keyed by (check type, address) with no serial
    id, the line and the riding rows filled from the rows' states."""
    for name in ("bouncer_batch_emails_check_type_email_global_id", "bouncer_batch_emails_bouncer_batch_id"):
        database.execute_sql('DROP INDEX IF EXISTS "%s"' % name)
    database.execute_sql("ALTER TABLE bouncer_batch_emails RENAME TO bouncer_batch_emails_v2")
    database.create_tables(INTERNAL_MODELS, safe=True)
    columns = "bouncer_batch_id, email_global_id, check_type, email_sent"
    database.execute_sql("INSERT INTO bouncer_batch_emails (%s) SELECT %s FROM bouncer_batch_emails_v2"
                         % (columns, columns))
    database.execute_sql("DROP TABLE bouncer_batch_emails_v2")
    move_rows_into_line()


def move_rows_into_line():
    """Rows of an earlier version: queued ones join the line, sent ones ride on their batch (and
    are `queued`, as every pending row is now)."""
    for statement in (
        "INSERT INTO queued_emails (row_id, batch_id, check_type, fifo_order, position, email_global_id, email,"
        " user_id) SELECT e.id, e.batch_id, e.check_type, e.fifo_order, e.position, e.email_global_id, e.email,"
        " b.user_id FROM user_batch_emails e JOIN user_batches b ON b.id = e.batch_id"
        " WHERE e.status = 'queued' OR (e.status = 'sent' AND e.bouncer_batch_id IS NULL)",
        "INSERT INTO riding_rows (bouncer_batch_id, batch_id, row_ids, rows)"
        " SELECT bouncer_batch_id, batch_id, %s, count(*) FROM user_batch_emails"
        " WHERE status = 'sent' AND bouncer_batch_id IS NOT NULL GROUP BY bouncer_batch_id, batch_id"
        % dialect().json_id_array("id"),
        "UPDATE user_batch_emails SET status = 'queued' WHERE status = 'sent'",
    ):
        database.execute_sql(statement)


# Indexes no query reads any more, which only cost every write: dropped where they exist.
# (The rows riding on a Bouncer batch were found by `user_batch_emails_bouncer_batch` until version
# 3 kept them in `riding_rows`: without it, ending 150k rows rewrites one index fewer. The rows
# to admit and the rows pending were found by indexes on `status` until version 4.)
RETIRED_INDEXES = ("email_deliverable_results_bouncer_batch_id", "email_catchall_results_bouncer_batch_id",
                   "user_batch_emails_bouncer_batch", "user_batch_emails_new", "user_batch_emails_pending")


def drop_retired_indexes():
    for name in RETIRED_INDEXES:
        database.execute_sql('DROP INDEX IF EXISTS "%s"' % name)


def keep_rows_fillfactor():
    """On PostgreSQL, the room `user_batch_emails` keeps on each page is this release's (an
    earlier one kept half): pages written from now on get it, pages already written keep theirs."""
    if dialect().name != "postgres":
        return
    options = database.execute_sql("SELECT reloptions FROM pg_class WHERE oid = 'user_batch_emails'::regclass"
                                   ).fetchone()[0]
    if "fillfactor=%d" % ROWS_FILLFACTOR not in (options or ()):
        database.execute_sql("ALTER TABLE user_batch_emails SET (fillfactor = %d)" % ROWS_FILLFACTOR)


V1_INDEXES = ("user_batches_status_id", "user_batch_emails_batch_id_position",
              "user_batch_emails_bouncer_batch_id_batch_id", "user_batch_emails_fifo",
              "user_batch_emails_pending")


def upgrade_sqlite_from_1():
    """SQLite cannot add checks or defaults to a table: each host table is made anew and its
    rows copied across, in one transaction. v1 numbered rows from 0; the contract is 1..n.
    A batch's place in line was its id."""
    database.execute_sql("PRAGMA foreign_keys = OFF")   # only outside a transaction
    try:
        with write_transaction():
            for name in V1_INDEXES:
                database.execute_sql('DROP INDEX IF EXISTS "%s"' % name)
            database.execute_sql("ALTER TABLE bouncer_batches ADD COLUMN bouncer_completed_at DATETIME")
            database.execute_sql('ALTER TABLE user_batches RENAME TO user_batches_v1')
            database.execute_sql('ALTER TABLE user_batch_emails RENAME TO user_batch_emails_v1')
            database.execute_sql(render(USER_BATCHES))
            database.execute_sql(render(USER_BATCH_EMAILS))
            database.execute_sql(
                'INSERT INTO user_batches (id, user_id, check_type, status, total, invalid, duplicates,'
                ' created_at, fifo_order, completed_at, failure_reason, source)'
                ' SELECT id, "user", check_type, status, total, invalid, duplicates, created_at, id,'
                " completed_at, failure_reason, 'cli' FROM user_batches_v1")
            database.execute_sql(
                'INSERT INTO user_batch_emails (id, batch_id, position, email, status, email_global_id,'
                ' check_type, fifo_order, bouncer_batch_id, failure_reason, completed_at)'
                ' SELECT id, batch_id, position + 1, email, status, email_global_id, check_type, batch_id,'
                ' bouncer_batch_id, failure_reason, completed_at FROM user_batch_emails_v1')
            database.execute_sql("DROP TABLE user_batch_emails_v1")
            database.execute_sql("DROP TABLE user_batches_v1")
            finish_upgrade()
    finally:
        database.execute_sql("PRAGMA foreign_keys = ON")


def upgrade_postgres_from_1():
    """PostgreSQL changes the tables in place; the indexes are made anew."""
    statements = [
        *('DROP INDEX IF EXISTS "%s"' % name for name in V1_INDEXES),
        "ALTER TABLE bouncer_batches ADD COLUMN bouncer_completed_at TIMESTAMP",
        'ALTER TABLE user_batches RENAME COLUMN "user" TO user_id',
        "ALTER TABLE user_batches ALTER COLUMN status SET DEFAULT 'new',"
        " ALTER COLUMN total SET DEFAULT 0, ALTER COLUMN invalid SET DEFAULT 0,"
        " ALTER COLUMN duplicates SET DEFAULT 0,"
        " ALTER COLUMN created_at SET DEFAULT (now() AT TIME ZONE 'utc'),"
        " ADD COLUMN fifo_order INTEGER, ADD COLUMN callback_url TEXT,"
        " ADD COLUMN cancelled_at TIMESTAMP, ADD COLUMN source TEXT, ADD COLUMN loader_seen_at TIMESTAMP",
        "UPDATE user_batches SET fifo_order = id, source = 'cli'",
        "ALTER TABLE user_batches"
        " ADD CONSTRAINT user_batches_user_id CHECK (length(btrim(user_id)) BETWEEN 1 AND 200),"
        " ADD CONSTRAINT user_batches_check_type CHECK (%(check_types)s),"
        " ADD CONSTRAINT user_batches_status CHECK (%(batch_states)s)" % CHECKS,
        "ALTER TABLE user_batch_emails ALTER COLUMN status SET DEFAULT 'new',"
        " ALTER COLUMN check_type DROP NOT NULL, ADD COLUMN fifo_order INTEGER",
        "UPDATE user_batch_emails SET position = position + 1, fifo_order = batch_id",
        "ALTER TABLE user_batch_emails"
        " ADD CONSTRAINT user_batch_emails_position CHECK (position >= 1),"
        " ADD CONSTRAINT user_batch_emails_status CHECK (%(row_states)s),"
        " ADD CONSTRAINT user_batch_emails_batch_id_fkey FOREIGN KEY (batch_id) REFERENCES user_batches (id)"
        % CHECKS,
    ]
    with write_transaction():
        for statement in statements:
            database.execute_sql(statement)
        finish_upgrade()


def finish_upgrade():
    for statement in (*INDEXES, *host_triggers(), RESULTS_VIEW):
        database.execute_sql(render(statement))
    upgrade_queue_tables()
    upgrade_rows_table()
    last = database.execute_sql("SELECT COALESCE(MAX(fifo_order), 0) FROM user_batches").fetchone()[0]
    FifoCounter.create(last=last)
    SchemaVersion.create(version=4)



TO_VERSION_4 = {1: upgrade_from_1, 2: upgrade_from_2, 3: upgrade_from_3}


def upgrade_to_5():
    """Version 4 to 5, each feature's statements together, each safe to run again."""
    # Fair share (QUEUE_POLICY=fair): each row in line knows its user and its turn, walked by
    # (check type, turn, place, position), and found by user; the weights, the line's order and
    # the users' shares of what was sent have tables of their own. Every row in line keeps turn
    # 0: the line stays the FIFO it was until a creation cycle under `fair` numbers it.
    add_columns("queued_emails", [("user_id", "TEXT NOT NULL DEFAULT ''"), ("turn", "{double} NOT NULL DEFAULT 0")])
    database.execute_sql("UPDATE queued_emails SET user_id = (SELECT b.user_id FROM user_batches b"
                         " WHERE b.id = queued_emails.batch_id)")
    database.execute_sql('DROP INDEX IF EXISTS "queued_emails_check_type_fifo_order_position"')
    database.create_tables([QueuedEmail, UserWeight, LineOrder, LineWeight, SentShare], safe=True)
    # Bouncer's batch lifecycle: greylisted verdicts re-checked, batches finished and deleted at
    # Bouncer, the credits Bouncer reports.
    add_columns("bouncer_batches", [
        ("finish_reason", "TEXT"), ("finish_asked_at", "{time}"), ("finish_accepted_at", "{time}"),
        ("credits", "INTEGER"), ("refunded", "INTEGER"), ("rechecks", "INTEGER NOT NULL DEFAULT 0"),
        ("deleted_at", "{time}")])
    database.execute_sql(UNDELETED_INDEX)
    add_columns("user_batch_emails", [("rechecks", "INTEGER NOT NULL DEFAULT 0")])
    add_columns("queued_emails", [("rechecks", "INTEGER NOT NULL DEFAULT 0"), ("not_before", "{time}")])
    for table in ("email_deliverable_results", "email_catchall_results"):
        add_columns(table, [("retry_after", "{time}")])
    # Personal data: a pruned batch keeps its counts; the rows naming an address are found by it.
    add_columns("user_batches", [("pruned_at", "{time}"), ("kept_counts", "TEXT")])
    database.execute_sql(ADDRESS_INDEX)
    # Tenants on the HTTP door: the API token that created a batch, as its digest.
    add_columns("user_batches", [("api_token_digest", "TEXT")])
    database.execute_sql(API_TOKEN_INDEX)
    # Admission: the cycle admitting a host's batch claims it, so two admitters never do the
    # same rows' work.
    add_columns("user_batches", [("admitter_seen_at", "{time}")])


def add_columns(table, columns):
    """Add each `(name, type)` column `table` does not have yet (an upgrade that ran halfway, or
    a table made from this release's models on the way, already has some)."""
    present = {column.name for column in database.get_columns(table)}
    for name, kind in columns:
        if name not in present:
            database.execute_sql('ALTER TABLE "%s" ADD COLUMN "%s" %s' % (table, name, render(kind)))


# {version: the step that brings a database from the version before it to this one}
STEPS = {5: upgrade_to_5}
