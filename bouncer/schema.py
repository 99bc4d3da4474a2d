"""The schema: created by `init-db`, or upgraded in place from an earlier release.

The two tables a host application writes, `user_batches` and `user_batch_emails`, are defined
here in SQL, because their contract lives in the database: every column but the few a host
gives has a database-side default (`created_at` is the current UTC time whatever the server's
time zone; a batch and its rows start `new`), and the database refuses what breaks the contract
(an unknown check type, an empty user id, a repeated position, a row of a batch that does not
exist). The view `user_batch_results` is what `results` prints, one row per submitted row.
The queue's own tables are created by Peewee from bouncer/models.py.

Versions (table `schema_version`): 1, the first release (`user_batches.user`, no defaults, rows
numbered from 0); 2, the host tables with their defaults and checks, a row `sent` while it rides
on a Bouncer batch; 3, the line (`queued_emails`) and the rows riding on Bouncer batches
(`riding_rows`) are tables of their own, so a claim no longer rewrites the rows it takes; 4, this
one: no index of `user_batch_emails` depends on a row's status, and on PostgreSQL its pages keep
room, so ending a row rewrites it in place (a HOT update) rather than adding an entry to each of
its indexes.
"""
import logging

from .db import database, is_postgres, write_transaction
from .models import ALL_MODELS, BATCH_STATES, INTERNAL_MODELS, ROW_STATES, FifoCounter, SchemaVersion

log = logging.getLogger(__name__)

VERSION = 4
ROWS_FILLFACTOR = 50

# A row not yet admitted has no check type: admission copies its batch's, and so does a cancel,
# so `check_type IS NULL` marks the rows to admit without naming the status, which changes again.
NEW_ROW_CHECK = "user_batch_emails_new_has_no_check_type"
NEW_ROW_RULE = "status <> 'new' OR check_type IS NULL"


def sql_list(values):
    return ", ".join("'%s'" % v for v in values)


CHECKS = {
    "check_types": "check_type IN ('deliverable', 'catchall')",
    "batch_states": "status IN (%s)" % sql_list(BATCH_STATES),
    "row_states": "status IN (%s)" % sql_list(ROW_STATES),
}

SQLITE = {
    "id": "INTEGER PRIMARY KEY AUTOINCREMENT",   # never reuses the id of a removed batch
    "row_id": "INTEGER PRIMARY KEY",
    "now_utc": "(strftime('%Y-%m-%d %H:%M:%f', 'now'))",
    "time": "DATETIME",
    "trim": "trim",
    "rows_storage": "",
    "new_row_check": "",    # a trigger: SQLite cannot add a check to an existing table
}
POSTGRES = {
    "id": "SERIAL PRIMARY KEY",
    "row_id": "SERIAL PRIMARY KEY",
    "now_utc": "(now() AT TIME ZONE 'utc')",
    "time": "TIMESTAMP",
    "trim": "btrim",
    # Half of each page left free at insert, so the row's later versions (admitted, then ended)
    # find room beside it and are written in place: measured, ending 150k rows took 0.8-0.9 s
    # against 2.0-2.2 s when each went to another page with new entries in every index.
    "rows_storage": " WITH (fillfactor = %d)" % ROWS_FILLFACTOR,
    "new_row_check": ",\n    CONSTRAINT %s CHECK (%s)" % (NEW_ROW_CHECK, NEW_ROW_RULE),
}

USER_BATCHES = """
CREATE TABLE user_batches (
    id {id},
    user_id TEXT NOT NULL CONSTRAINT user_batches_user_id CHECK (length({trim}(user_id)) BETWEEN 1 AND 200),
    check_type TEXT NOT NULL CONSTRAINT user_batches_check_type CHECK ({check_types}),
    status TEXT NOT NULL DEFAULT 'new' CONSTRAINT user_batches_status CHECK ({batch_states}),
    total INTEGER NOT NULL DEFAULT 0,
    invalid INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    created_at {time} NOT NULL DEFAULT {now_utc},
    fifo_order INTEGER,
    completed_at {time},
    failure_reason TEXT,
    callback_url TEXT,
    cancelled_at {time},
    source TEXT,
    loader_seen_at {time}
)"""

USER_BATCH_EMAILS = """
CREATE TABLE user_batch_emails (
    id {row_id},
    batch_id INTEGER NOT NULL REFERENCES user_batches (id),
    position INTEGER NOT NULL CONSTRAINT user_batch_emails_position CHECK (position >= 1),
    email TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'new' CONSTRAINT user_batch_emails_status CHECK ({row_states}),
    email_global_id INTEGER,
    check_type TEXT,
    fifo_order INTEGER,
    bouncer_batch_id INTEGER,
    failure_reason TEXT,
    completed_at {time}{new_row_check}
){rows_storage}"""

# No index here depends on `status`: a row that ends (150k per status cycle at full load)
# changes no indexed column, so PostgreSQL rewrites it in place. Whether a user batch has rows
# pending is asked of the line, the riding rows and the rows not yet admitted (progress.py).
UNADMITTED_INDEX = ("CREATE INDEX IF NOT EXISTS user_batch_emails_unadmitted ON user_batch_emails (batch_id, position)"
                    " WHERE check_type IS NULL")
INDEXES = [
    "CREATE INDEX user_batches_status ON user_batches (status, id)",
    "CREATE INDEX user_batches_user ON user_batches (user_id, id)",
    "CREATE UNIQUE INDEX user_batch_emails_batch_position ON user_batch_emails (batch_id, position)",
    # Admission: rows nobody has looked at yet.
    UNADMITTED_INDEX,
]

# SQLite checks REFERENCES only on connections that turned foreign keys on; a host's plain
# sqlite3 connection has them off. A trigger holds on every connection.
SQLITE_TRIGGERS = ["""
CREATE TRIGGER IF NOT EXISTS user_batch_emails_batch_exists BEFORE INSERT ON user_batch_emails
WHEN NOT EXISTS (SELECT 1 FROM user_batches WHERE id = NEW.batch_id)
BEGIN SELECT RAISE(ABORT, 'FOREIGN KEY constraint failed: no user batch with this batch_id'); END
""", """
CREATE TRIGGER IF NOT EXISTS %s BEFORE INSERT ON user_batch_emails
WHEN NOT (%s)
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: %s (a new row leaves check_type to the queue)'); END
""" % (NEW_ROW_CHECK, "NEW.status <> 'new' OR NEW.check_type IS NULL", NEW_ROW_CHECK)]

RESULTS_VIEW = """
CREATE VIEW user_batch_results AS
SELECT e.batch_id, e.position, e.email,
       CASE WHEN e.status = 'done' THEN COALESCE(d.status, c.status, 'unknown')
            WHEN e.status IN ('invalid', 'failed', 'cancelled') THEN e.status
            ELSE 'pending' END AS status,
       CASE WHEN e.status = 'done' THEN COALESCE(d.reason, c.reason) ELSE e.failure_reason END AS reason,
       COALESCE(d.score, c.score) AS score,
       COALESCE(d.accept_all, c.accept_all) AS accept_all,
       COALESCE(d.disposable, c.disposable) AS disposable,
       COALESCE(d.free, c.free) AS free,
       COALESCE(d.role, c.role) AS role,
       COALESCE(d.disabled, c.disabled) AS disabled,
       COALESCE(d.full_mailbox, c.full_mailbox) AS full_mailbox,
       COALESCE(d.provider, c.provider) AS provider,
       COALESCE(d.checked_at, c.checked_at) AS checked_at
FROM user_batch_emails e
JOIN user_batches b ON b.id = e.batch_id
LEFT JOIN email_deliverable_results d
       ON e.status = 'done' AND b.check_type = 'deliverable' AND d.email_global_id = e.email_global_id
LEFT JOIN email_catchall_results c
       ON e.status = 'done' AND b.check_type = 'catchall' AND c.email_global_id = e.email_global_id
"""


def empty_tables():
    """Every row gone and the counters back at the start, the schema kept (tests on PostgreSQL,
    where making a database anew is slow)."""
    tables = [m._meta.table_name for m in ALL_MODELS if m not in (FifoCounter, SchemaVersion)]
    database.execute_sql("TRUNCATE %s RESTART IDENTITY CASCADE" % ", ".join('"%s"' % t for t in tables))
    FifoCounter.update(last=0).execute()


def dialect():
    return POSTGRES if is_postgres() else SQLITE


def render(template):
    return template.format(**dialect(), **CHECKS)


def create_schema():
    """Create the schema, or bring an earlier release's up to this one; safe to run again."""
    with database.connection_context():
        version = current_version()
        if version == VERSION:
            database.create_tables(INTERNAL_MODELS, safe=True)   # any the version gained since
            drop_retired_indexes()
            return "schema up to date (version %d)" % VERSION
        if version is None:
            create_all()
            return "schema created (version %d)" % VERSION
        if version > VERSION:
            raise RuntimeError("the database's schema is version %d, newer than this release's %d"
                               % (version, VERSION))
        upgrade_from(version)
        return "schema upgraded from version %d to %d" % (version, VERSION)


def current_version():
    """The schema version of the database: None when it has no schema at all."""
    tables = set(database.get_tables())
    if "schema_version" in tables:
        return SchemaVersion.select(SchemaVersion.version).scalar()
    if "user_batches" in tables:
        return 1
    return None


def create_all():
    with write_transaction():
        database.create_tables(INTERNAL_MODELS)
        for statement in (USER_BATCHES, USER_BATCH_EMAILS, *INDEXES, *host_triggers(), RESULTS_VIEW):
            database.execute_sql(render(statement))
        FifoCounter.create(last=0)
        SchemaVersion.create(version=VERSION)


def host_triggers():
    return [] if is_postgres() else SQLITE_TRIGGERS


def upgrade_from(version):
    log.warning("Upgrading the schema from version %d to %d", version, VERSION)
    if version == 3:
        upgrade_from_3()
    elif version == 2:
        upgrade_from_2()
    elif is_postgres():
        upgrade_postgres_from_1()
    else:
        upgrade_sqlite_from_1()


def upgrade_from_2():
    """Version 2 walked the queued rows of `user_batch_emails` itself and marked the rows it sent
    `sent`: its queued rows join the line, its sent rows ride on their Bouncer batch."""
    with write_transaction():
        upgrade_queue_tables()
        database.execute_sql('DROP INDEX IF EXISTS "user_batch_emails_fifo"')
        upgrade_rows_table()
        SchemaVersion.update(version=VERSION).execute()


def upgrade_from_3():
    with write_transaction():
        upgrade_rows_table()
        SchemaVersion.update(version=VERSION).execute()


def upgrade_rows_table():
    """From version 1, 2 or 3: rows cancelled before admission take their batch's check type,
    as every row that left `new` has; the rows to admit are found by that, and no index asks a
    row's status any more; on PostgreSQL the table's new pages keep room for rewrites in place
    (pages already written are as they were)."""
    database.execute_sql("UPDATE user_batch_emails SET check_type = (SELECT b.check_type FROM user_batches b"
                         " WHERE b.id = user_batch_emails.batch_id) WHERE check_type IS NULL AND status <> 'new'")
    database.execute_sql(UNADMITTED_INDEX)
    if is_postgres():
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
        "INSERT INTO queued_emails (row_id, batch_id, check_type, fifo_order, position, email_global_id, email)"
        " SELECT id, batch_id, check_type, fifo_order, position, email_global_id, email FROM user_batch_emails"
        " WHERE status = 'queued' OR (status = 'sent' AND bouncer_batch_id IS NULL)",
        "INSERT INTO riding_rows (bouncer_batch_id, batch_id, row_ids, rows)"
        " SELECT bouncer_batch_id, batch_id, %s, count(*) FROM user_batch_emails"
        " WHERE status = 'sent' AND bouncer_batch_id IS NOT NULL GROUP BY bouncer_batch_id, batch_id"
        % ("json_agg(id ORDER BY id)::text" if is_postgres() else "json_group_array(id)"),
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
    SchemaVersion.create(version=VERSION)
