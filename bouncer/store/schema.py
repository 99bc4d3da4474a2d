"""The schema of this release: the host-facing tables in SQL of their own, the view, the indexes.

The two tables a host application writes, `user_batches` and `user_batch_emails`, are defined
here in SQL, because their contract lives in the database: every column but the few a host
gives has a database-side default (`created_at` is the current UTC time whatever the server's
time zone; a batch and its rows start `new`), and the database refuses what breaks the contract
(an unknown check type, an empty user id, a repeated position, a row of a batch that does not
exist). The view `user_batch_results` is what `results` prints, one row per submitted row.
The queue's own tables are created by Peewee from models.py. migrations.py creates or upgrades.
"""

import logging

from peewee import sort_models

from bouncer.states import SENT, BatchState, RowState
from bouncer.store.database import database, dialect, write_transaction
from bouncer.store.models import ALL_MODELS, INTERNAL_MODELS, FifoCounter, SchemaVersion

log = logging.getLogger(__name__)


VERSION = 5
ROWS_FILLFACTOR = 30


# A row not yet admitted has no check type: admission copies its batch's, and so does a cancel,
# so `check_type IS NULL` marks the rows to admit without naming the status, which changes again.
NEW_ROW_CHECK = "user_batch_emails_new_has_no_check_type"
NEW_ROW_RULE = "status <> 'new' OR check_type IS NULL"


def sql_list(values):
    return ", ".join("'%s'" % v for v in values)


CHECKS = {
    "check_types": "check_type IN ('deliverable', 'catchall')",
    "batch_states": "status IN (%s)" % sql_list(BatchState),
    # `sent` too: versions 1 and 2 stored it, and their upgrade copies such rows before moving them
    # onto their Bouncer batches (migrations.move_rows_into_line); no row is `sent` after that.
    "row_states": "status IN (%s)" % sql_list(list(RowState) + [SENT]),
}


FRAGMENTS = {}   # the DDL's fragments, by dialect
FRAGMENTS["sqlite"] = {
    "id": "INTEGER PRIMARY KEY AUTOINCREMENT",   # never reuses the id of a removed batch
    "row_id": "INTEGER PRIMARY KEY",
    "now_utc": "(strftime('%Y-%m-%d %H:%M:%f', 'now'))",
    "time": "DATETIME",
    "double": "REAL",
    "trim": "trim",
    "rows_storage": "",
    "new_row_check": "",    # a trigger: SQLite cannot add a check to an existing table
}


FRAGMENTS["postgres"] = {
    "id": "SERIAL PRIMARY KEY",
    "row_id": "SERIAL PRIMARY KEY",
    "now_utc": "(now() AT TIME ZONE 'utc')",
    "time": "TIMESTAMP",
    "double": "DOUBLE PRECISION",
    "trim": "btrim",
    # 70% of each page left free at insert, so every later version of a row (admitted, then
    # ended, each wider) finds room on its page: ending it is then an update in place with no new
    # index entry (ending 150k rows: 0.8-0.9 s, against 2.0-2.2 s when each went to another page
    # with new entries in every index), and no page of ended rows keeps room for a new row, so
    # rows submitted after a long history lie together at the table's end (with half of each
    # page free, some versions moved, and the pages they moved to took new rows one or two each).
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
    loader_seen_at {time},
    pruned_at {time},
    kept_counts TEXT,
    api_token_digest TEXT,
    admitter_seen_at {time}
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
    completed_at {time},
    rechecks INTEGER NOT NULL DEFAULT 0{new_row_check}
){rows_storage}"""


# No index here depends on `status`: a row that ends (150k per status cycle at full load)
# changes no indexed column, so PostgreSQL rewrites it in place. Whether a user batch has rows
# pending is asked of the line, the riding rows and the rows not yet admitted (progress.py).
UNADMITTED_INDEX = ("CREATE INDEX IF NOT EXISTS user_batch_emails_unadmitted ON user_batch_emails (batch_id, position)"
                    " WHERE check_type IS NULL")


# Erasure and retention: the rows that name an address (does anyone still hold it? which
# spelling?). It never changes when a row ends, so that update stays in place (HOT).
ADDRESS_INDEX = ("CREATE INDEX IF NOT EXISTS user_batch_emails_address ON user_batch_emails (email_global_id)"
                 " WHERE email_global_id IS NOT NULL")
# The completed batches not yet deleted at Bouncer (BOUNCER_DELETE_RESULTS), found without reading
# the whole ledger. Made here, not by the model: an upgrade makes the models' tables and indexes
# before the ledger has the column.
UNDELETED_INDEX = ("CREATE INDEX IF NOT EXISTS bouncer_batches_undeleted ON bouncer_batches"
                   " (check_type, status, deleted_at)")
# Tenants on the HTTP door: a token lists its own batches, newest first.
API_TOKEN_INDEX = ("CREATE INDEX IF NOT EXISTS user_batches_api_token ON user_batches (api_token_digest, id)"
                   " WHERE api_token_digest IS NOT NULL")


INDEXES = [
    "CREATE INDEX user_batches_status ON user_batches (status, id)",
    "CREATE INDEX user_batches_user ON user_batches (user_id, id)",
    "CREATE UNIQUE INDEX user_batch_emails_batch_position ON user_batch_emails (batch_id, position)",
    # Admission: rows nobody has looked at yet.
    UNADMITTED_INDEX,
    ADDRESS_INDEX,
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
    # Rows before the batches they belong to (a foreign key holds them together).
    tables = [m._meta.table_name for m in reversed(sort_models(ALL_MODELS)) if m not in (FifoCounter, SchemaVersion)]
    dialect().empty_tables(database, tables)
    FifoCounter.update(last=0).execute()


def render(template):
    return template.format(**FRAGMENTS[dialect().name], **CHECKS)


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
        for statement in (USER_BATCHES, USER_BATCH_EMAILS, *INDEXES, UNDELETED_INDEX, API_TOKEN_INDEX,
                          *host_triggers(), RESULTS_VIEW):
            database.execute_sql(render(statement))
        FifoCounter.create(last=0)
        SchemaVersion.create(version=VERSION)


def host_triggers():
    """SQLite checks REFERENCES only on connections that turned foreign keys on (a host's plain
    sqlite3 connection has them off): triggers hold on every connection."""
    return SQLITE_TRIGGERS if dialect().name == "sqlite" else []

